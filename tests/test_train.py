"""train.py: model, optimizer and schedules on CPU, then whole runs of the real script."""

import io
import math
import os
import re
import subprocess
import sys
import tokenize

import pytest
import torch

import prepare
from attention_reference import flash_backward, flash_forward
from conftest import ROOT, train_copy
from formula_variants import VARIANTS, variant_source
from train_source import edit_code, load_definitions, training_losses

TRAIN_PY = os.path.join(ROOT, "train.py")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tr():
    return load_definitions()


def sdpa(seq_len=2048):
    return prepare.make_attention("sdpa", CPU, seq_len)


def test_default_model_shape_and_parameter_count(tr):
    with torch.device("meta"):  # no memory is allocated
        model = tr.GPT(tr.GPTConfig(), sdpa())
    dim = math.ceil(tr.DEPTH * tr.ASPECT_RATIO / tr.HEAD_DIM) * tr.HEAD_DIM
    assert (tr.DEPTH, dim, dim // tr.HEAD_DIM) == (8, 512, 4)
    n = sum(p.numel() for p in model.parameters())
    # by hand from the spec: wte + lm_head, 8 blocks (q k v proj + 4x MLP), 4 value embeddings,
    # 4 value-embedding gates (32 -> 4 heads), 2 x 8 lambdas
    expected = 2 * 8192 * 512 + 8 * (4 * 512 * 512 + 2 * 512 * 2048) + 4 * 8192 * 512 + 4 * 32 * 4 + 2 * 8
    assert n == expected == 50_332_176 and round(n / 1e6, 1) == 50.3
    assert model.windows == [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]
    assert sorted(model.value_embeds.keys()) == ["1", "3", "5", "7"]
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [False, True] * 4
    assert tuple(model.cos.shape) == (1, 20480, 1, 128) and model.cos.dtype == torch.bfloat16
    # 6 x (params except wte, value embeddings, lambdas) + 12 x heads x head_dim x window per layer
    dense = n - 8192 * 512 - 4 * 8192 * 512 - 16
    assert model.num_flops_per_token() == 6 * dense + sum(12 * 4 * 128 * w for w in model.windows)


def small_config(tr, n_layer=2, **fused):
    return tr.GPTConfig(sequence_len=64, vocab_size=256, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=64, **fused)


def small_model(tr, seed=0, n_layer=2, **fused):
    torch.manual_seed(seed)
    model = tr.GPT(small_config(tr, n_layer, **fused), sdpa(64))
    model.init_weights()
    return model


def test_norm_is_rms_norm_that_keeps_its_output(tr):
    """norm's forward is F.rms_norm's bit for bit (float32's eps also for bf16 inputs, which matters
    for small ones), and its backward, computed from the output, is the exact gradient."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (1.0, 0.01):
            x = (torch.randn(4, 9, 256) * scale).to(dtype)
            assert torch.equal(tr.norm(x), F.rms_norm(x, (256,))), (dtype, scale)
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tr.norm, (x,))
    # bf16: the gradient from the rounded output is as close to the exact one as F.rms_norm's
    x = torch.randn(8, 33, 512, dtype=torch.float64)
    dy = torch.randn_like(x)
    exact = torch.autograd.grad(F.rms_norm(x.requires_grad_(), (512,)), x, dy)[0]
    for fn in (tr.norm, lambda t: F.rms_norm(t, (512,))):
        xb = x.detach().bfloat16().requires_grad_()
        got = torch.autograd.grad(fn(xb), xb, dy.bfloat16())[0].double()
        assert ((got - exact).norm() / exact.norm()).item() < 6e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_gradient_is_the_same_compiled(tr, dtype):
    """Under torch.compile an autograd.Function whose output came from a no-op .to() got a zero
    gradient (float32 inputs: every norm would have cut the backward); compiled must equal eager."""
    import torch._dynamo

    torch.manual_seed(0)
    x, w = torch.randn(4, 64).to(dtype).requires_grad_(), torch.randn(64, 64)
    f = lambda x: (tr.norm(x).float() @ w).pow(3).sum()  # noqa: E731
    eager = torch.autograd.grad(f(x), x)[0]
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(f, backend="aot_eager")(x), x)[0]
    atol = 1e-2 * eager.abs().max().item()
    assert eager.abs().sum() > 0 and torch.allclose(compiled.float(), eager.float(), rtol=1e-2, atol=atol)


def test_rotary_rotates_the_halves_as_the_spec_writes_it(tr):
    """y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos with base-10000 angles: bit for bit, in bf16
    as on the GPU and in float32, from the model's own cached tables."""
    model = tr.GPT(tr.GPTConfig(sequence_len=64, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=64), sdpa(64))
    T, D = 64, 32
    angles = torch.outer(torch.arange(T, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    cos, sin = angles.cos().bfloat16()[None, :, None, :], angles.sin().bfloat16()[None, :, None, :]
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(3, T, 2, D).to(dtype)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        c, s = cos.to(dtype), sin.to(dtype)
        expected = torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1)
        got = tr.apply_rotary(x, model.cos[:, :T].to(dtype), model.sin[:, :T].to(dtype))
        assert torch.equal(got, expected)
    assert not torch.equal(tr.apply_rotary(x, model.cos[:, 1 : T + 1], model.sin[:, 1 : T + 1]), expected)


def test_init_and_forward(tr):
    model = small_model(tr)
    assert not model.transformer.h[0].attn.c_proj.weight.any() and not model.transformer.h[1].mlp.c_proj.weight.any()
    assert model.x0_lambdas.tolist() == pytest.approx([0.1, 0.1]) and model.resid_lambdas.tolist() == [1.0, 1.0]
    s = 3**0.5 / 64**0.5
    assert model.transformer.h[0].attn.c_q.weight.abs().max() <= s
    assert 0.0005 < model.lm_head.weight.std() < 0.0015
    x = torch.randint(0, 256, (3, 64))
    logits = model(x)
    assert logits.shape == (3, 64, 256) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15  # soft cap
    per_token = model(x, x, reduction="none")
    assert per_token.shape == (3 * 64,)
    assert model(x, x).item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    # the model is causal: changing a later token leaves earlier logits alone
    x2 = x.clone()
    x2[:, 40] = (x2[:, 40] + 1) % 256
    assert torch.allclose(model(x2)[:, :40], logits[:, :40], atol=1e-5)
    assert not torch.allclose(model(x2)[:, 40:], logits[:, 40:], atol=1e-5)


def test_compiled_optimizer_is_one_graph_for_every_step(tr, monkeypatch):
    """The whole optimizer step compiles to one graph, and new learning rates, momenta and weight
    decays (they change every step) do not recompile it; it moves the weights as the eager
    update does. Graphs and guards are Dynamo's: AOTAutograd runs the captured graph here instead
    of Inductor, whose C++ for the CPU (~25 s on 2 cores) the GPU never uses."""
    import functools

    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.randint(0, 256, (2, 64))
    weights = {}
    for compiled in (False, True):
        model = small_model(tr)
        opt = tr.build_optimizer(model, compile_math=compiled)
        for i in range(3):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * (1 - 0.2 * i)
                if group["kind"] == "muon":
                    group["momentum"], group["weight_decay"] = 0.85 + 0.05 * i, 0.2 * (1 - 0.2 * i)
            model(x, x).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        weights[compiled] = [p.detach().clone() for p in model.parameters()]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    initial = [p.detach() for p in small_model(tr).parameters()]
    assert not all(torch.equal(w, w0) for w, w0 in zip(weights[True], initial))
    for eager, compiled in zip(weights[False], weights[True]):
        assert torch.allclose(eager, compiled, atol=5e-3), (eager - compiled).abs().max()


# ---------------------------------------------------------------------------
# Whole runs of the real script on CPU, on the tiny fixture data

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth"]


def run_train(path, cache, env_extra=None):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_TIME_BUDGET="2", AUTORESEARCH_EVAL_TOKENS="8192",
               CUDA_VISIBLE_DEVICES="")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, path], cwd=os.path.dirname(path), env=env, capture_output=True, text=True,
                          timeout=300)


def tiny_training_losses(attention=None, fused=(), batch=4):
    """Per-step losses of 20 training steps of a 2-layer train.py model on CPU, one seed, fixed batches."""
    tr = load_definitions()
    config = small_config(tr, fused_mlp="mlp" in fused, fused_loss="loss" in fused)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (20, batch, 65), generator=g) % 50  # a skewed unigram: learnable
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    return training_losses(attention or sdpa(64), batches, config, CPU, compile=False)


def test_flash_op_path_trains_like_plain_attention():
    """Same mathematics: 20 training steps of train.py's model and optimizer from one seed on the
    same batches give the same losses through the flash-attention op (reference kernels standing
    in for flash-attn-4) as through SDPA. The GPU check of the real kernels is
    benchmarks/same_math.py."""
    plain = tiny_training_losses()
    op = tiny_training_losses(prepare.flash_attention_op("reference", flash_forward, flash_backward))
    assert plain[-1] < plain[0] - 1  # it trains
    assert max(abs(a - b) for a, b in zip(plain, op)) < 3e-5, list(zip(plain, op))


def test_fused_mlp_trains_like_plain_mlp(triton_interpreter):
    """Same mathematics for the fused MLP kernel (Triton's interpreter, float32): 20 training
    steps from one seed on the same batches, against the MLP formula in PyTorch. The GPU check in
    bf16 is benchmarks/same_math.py fa4 fa4/mlp."""
    plain = tiny_training_losses()
    fused = tiny_training_losses(fused=("mlp",))
    assert plain[-1] < plain[0] - 1  # it trains
    assert max(abs(a - b) for a, b in zip(plain, fused)) < 3e-5, list(zip(plain, fused))


def test_model_with_both_fused_kernels_has_the_same_loss_and_gradients(tr, triton_interpreter):
    """The whole model, one forward and backward with random weights everywhere (the zero-started
    projections would hide the MLP), with the fused MLP and loss against their formulas; some
    targets -1. (Training trajectories of the loss are compared on the GPU, by same_math.py: on the
    CPU the residual scalars' first gradient is float32 noise around an exact 0, which AdamW's eps
    of 1e-10 amplifies into full-size steps in either implementation.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 64), generator=g)
    y = torch.randint(-1, 256, (2, 64), generator=g)
    results = []
    for fused in (False, True):
        model = small_model(tr, fused_mlp=fused, fused_loss=fused)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        loss = model(x, y)
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    assert prepare.relative_error(results[1], results[0]) < 1e-5


def test_fused_mlp_matches_float64_and_stays_whole_under_compile(tr, triton_interpreter):
    g = torch.Generator().manual_seed(0)
    # no multiple of the kernel's blocks (64 x 64 x 32 here): the edges are masked; forward: 4 tiles on 3 programs,
    # two of which step past the end
    M, C, H = 70, 48, 96
    x, dout = torch.randn(M, C, generator=g), torch.randn(M, C, generator=g)
    w_fc, w_proj = torch.randn(H, C, generator=g) / 7, torch.randn(C, H, generator=g) / 10
    out, saved = tr.mlp_op(x, w_fc, w_proj)
    expected = (x.double() @ w_fc.double().T).relu().square()  # kept for the backward: weight gradient, sqrt = relu(h)
    assert ((saved - expected).abs().max() / expected.max()).item() < 1e-6 and (saved[expected == 0] == 0).all()
    reference = [t.double().requires_grad_() for t in (x, w_fc, w_proj)]
    ref_out = (reference[0] @ reference[1].T).relu().square() @ reference[2].T  # relu(x W_fc^T)² W_proj^T
    expected = [ref_out, *torch.autograd.grad(ref_out, reference, dout.double())]
    compiled = torch.compile(tr.fused_mlp, fullgraph=True, backend="aot_eager")  # a graph break would raise here
    for fn in (tr.fused_mlp, compiled, tr.mlp):
        leaves = [t.clone().requires_grad_() for t in (x.view(2, 35, C), w_fc, w_proj)]
        got = fn(*leaves)
        got = [got.view(M, C), *torch.autograd.grad(got, leaves, dout.view(2, 35, C))]
        assert [t.shape for t in got] == [(M, C), (2, 35, C), (H, C), (C, H)] and got[0].dtype == torch.float32
        assert prepare.relative_error([got[0], got[1].view(M, C), *got[2:]], expected) <= 1e-6, fn
    torch.library.opcheck(tr.mlp_op, (x, w_fc.requires_grad_(), w_proj))  # fake and autograd agree with the kernel


def test_fused_loss_matches_float64_and_stays_whole_under_compile(tr, triton_interpreter):
    g = torch.Generator().manual_seed(0)
    N, C, V = 21, 24, 300  # the vocabulary is no multiple of the kernel's chunk (128 here): the last one is masked
    x, w_head = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)  # logits of ~5: past the linear part
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -1  # ignored: no loss, no gradient
    dlosses = torch.rand(N, generator=g)  # a different weight per token: the backward must apply each to its row
    losses, dlogits = tr.token_losses_op(x, w_head, targets, True)
    assert dlogits.shape == (N, V) and not dlogits[::7].any()
    reference = [x.double().requires_grad_(), w_head.double().requires_grad_()]
    logits = 15 * torch.tanh(reference[0] @ reference[1].T / 15)  # the soft cap, written from the spec
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1, reduction="none")
    expected = [ref, *torch.autograd.grad(ref, reference, dlosses.double())]
    assert (ref[::7] == 0).all()
    compiled = torch.compile(tr.fused_token_losses, fullgraph=True, backend="aot_eager")  # a graph break raises here
    for fn in (tr.fused_token_losses, compiled, tr.token_losses):
        leaves = [x.view(3, 7, C).clone().requires_grad_(), w_head.clone().requires_grad_()]
        got = fn(*leaves, targets.view(3, 7))
        got = [got, *torch.autograd.grad(got, leaves, dlosses)]
        assert got[0].shape == (N,) and got[0].dtype == torch.float32
        assert prepare.relative_error([got[0], got[1].view(N, C), got[2]], expected) <= 1e-6, fn
    with torch.no_grad():  # evaluation: the losses only, no gradient written
        assert prepare.relative_error([tr.fused_token_losses(x, w_head, targets)], expected[:1]) <= 1e-6
        assert tr.token_losses_op(x, w_head, targets, False)[1].numel() == 0
    torch.library.opcheck(tr.token_losses_op, (x, w_head.requires_grad_(), targets, True))  # fake and autograd agree


def test_start_up_check_takes_agreeing_kernels_and_refuses_the_others(tmp_path, triton_interpreter):
    """Variants made as program.md says (tests/formula_variants.py): a formula edited in PyTorch and in
    its tile function passes the check; edited in PyTorch alone, its kernel is refused with the
    reason, and the run uses the formula. The z-loss changes the loss by ~0.1% only: the float32
    part of the check sees it."""
    source = open(TRAIN_PY).read()
    refused_by_name = {"gelu": "", "gelu_plain": "mlp", "relu": "", "relu_plain": "mlp", "zloss": "",
                       "zloss_plain": "loss"}
    assert sorted(refused_by_name) == sorted(VARIANTS)
    for name, refused in refused_by_name.items():
        path = tmp_path / f"train_{name}.py"
        path.write_text(variant_source(name, source))
        variant = load_definitions(str(path))
        config = variant.GPTConfig(sequence_len=64, vocab_size=128, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
        notes = variant.check_fused_kernels(CPU, config, bf16=False)
        for kernel, note in zip(("mlp", "loss"), notes):
            if kernel == refused:
                disagrees = r"fused kernel disagrees with the formula: max err \S+ in float32"
                assert re.fullmatch(disagrees, note), (name, note)
            else:
                assert note == "", (name, kernel, note)


def test_header_says_plain_when_the_model_does_not_call_a_fused_kernel(tr, tmp_path, triton_interpreter):
    """The header reports what the model really ran: an MLP written out in PyTorch does not call the
    fused kernel even where the kernel passed its check."""
    call = "        return (fused_mlp if self.fused else mlp)(x, self.c_fc.weight, self.c_proj.weight)\n"
    path = tmp_path / "train_written_out.py"
    written_out = "        return self.c_proj(torch.relu(self.c_fc(x)).square())\n"
    path.write_text(edit_code(open(TRAIN_PY).read(), call, written_out))
    idx = torch.zeros((3, 100), dtype=torch.long)
    for module, mlp_status in ((tr, "fused"), (load_definitions(str(path)), "plain (the model does not call it)")):
        config = module.GPTConfig(sequence_len=128, vocab_size=128, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                                  fused_mlp=True, fused_loss=True)
        model = module.GPT(config, sdpa(128))
        with torch.no_grad():
            ran = prepare.ops_called(lambda: model(idx, idx))
        assert module.kernel_status(module.MLP_OP, "", ran) == mlp_status
        assert module.kernel_status(module.LOSS_OP, "", ran) == "fused"
    assert tr.kernel_status(tr.MLP_OP, "no CUDA", set()) == "plain (no CUDA)"


def test_compile_cache_sees_edits_to_kernels_and_norm(tmp_path, triton_interpreter):
    """Inductor's on-disk cache knows a custom op by its name only: an op whose autograd rule was
    edited would be served with the old backward. train.py names its ops after a hash of their
    source, and lets the cache keep graphs with its RMSNorm Function, whose code the cache keys on.
    One process compiles the same function of train.py's norm and fused MLP four times, with the
    in-memory caches reset in between: train.py (a miss), again (a hit, the same gradients), a copy
    whose MLP backward doubles its gradients, a copy whose norm backward does (each a miss, and
    the doubled gradients). ~50 s on 2 cores: Inductor compiles C++ for the CPU, three times."""
    source = open(TRAIN_PY).read()
    edits = {"kernel": ("    return mlp_backward_op(dout, *ctx.saved_tensors)\n",
                        "    return tuple(2 * g for g in mlp_backward_op(dout, *ctx.saved_tensors))\n"),
             "norm": ("* rstd).to(dy.dtype)", "* rstd * 2).to(dy.dtype)")}
    paths = [TRAIN_PY, TRAIN_PY]
    for name, (old, new) in edits.items():
        paths.append(str(tmp_path / f"train_{name}.py"))
        open(paths[-1], "w").write(edit_code(source, old, new))
    script = tmp_path / "grads.py"
    script.write_text(
        "import sys, torch\n"
        "from train_source import load_definitions\n"
        "from torch._dynamo.utils import counters\n"
        "for path in sys.argv[1:]:\n"
        "    tr = load_definitions(path)\n"
        "    torch._dynamo.reset()\n"
        "    aot = counters['aot_autograd']\n"
        "    hit, miss = aot['autograd_cache_hit'], aot['autograd_cache_miss']\n"
        "    torch.manual_seed(0)\n"
        "    x = torch.randn(16, 32, requires_grad=True)\n"
        "    w_fc, w_proj = torch.randn(64, 32, requires_grad=True), torch.randn(32, 64, requires_grad=True)\n"
        "    torch.compile(lambda x, a, b: tr.fused_mlp(tr.norm(x), a, b).square().sum())(x, w_fc, w_proj).backward()\n"
        "    print(x.grad.abs().sum().item(), w_fc.grad.abs().sum().item(),\n"
        "          aot['autograd_cache_hit'] - hit, aot['autograd_cache_miss'] - miss)\n"
    )
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=os.path.join(ROOT, "tests"))
    result = subprocess.run([sys.executable, str(script), *paths], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [[float(v) for v in line.split()] for line in result.stdout.splitlines()]
    (x1, w1, hit1, miss1), (x2, w2, hit2, miss2), (x3, w3, hit3, miss3), (x4, w4, hit4, miss4) = runs
    assert (hit1, miss1) == (0, 1) and (hit2, miss2) == (1, 0) and (x2, w2) == (x1, w1)
    assert (hit3, miss3) == (0, 1) and x3 == pytest.approx(2 * x1, rel=1e-5) and w3 == pytest.approx(2 * w1, rel=1e-5)
    assert (hit4, miss4) == (0, 1) and x4 == pytest.approx(2 * x1, rel=1e-5) and w4 == pytest.approx(w1, rel=1e-5)


def reword_comments(source, module_level_only=False):
    """source with every comment (or every one that starts a line, section headers included) reworded."""
    lines = source.splitlines(keepends=True)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row, col = token.start
        if token.type == tokenize.COMMENT and (col == 0 or not module_level_only):
            line = lines[row - 1]
            reworded = "# reworded: " + token.string[1:].strip()[::-1]
            lines[row - 1] = line[:col] + reworded + line[col + len(token.string):]
    return "".join(lines)


def test_comments_and_headers_carry_nothing(tiny_cache, tmp_path):
    """An agent may reword any comment of train.py: with every section header and comment between
    definitions reworded, the ops keep their names (Inductor's caches stay warm); with every comment
    reworded, the definitions still load and the run still ends with its summary. Edits to a formula
    or an op's backward rename the ops (never served stale); a hyperparameter does not."""
    source = open(TRAIN_PY).read()
    versions = {}
    for name, text in [("train", source), ("headers", reword_comments(source, module_level_only=True)),
                       ("formula", edit_code(source, "    return 2.0 * tl.sqrt(y)\n", "    return 2 * tl.sqrt(y)\n")),
                       ("backward", edit_code(source, "    ctx.save_for_backward(*inputs, output[1])\n",
                                              "    ctx.save_for_backward(*inputs, output[1])  # moved\n    pass\n")),
                       ("hyperparameter", edit_code(source, "MATRIX_LR = 0.04\n", "MATRIX_LR = 0.05\n"))]:
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        versions[name] = load_definitions(str(path)).OPS_VERSION
    assert versions["headers"] == versions["train"] == versions["hyperparameter"]
    assert len({versions["train"], versions["formula"], versions["backward"]}) == 3
    path = train_copy(tmp_path / "reworded")
    reworded = reword_comments(open(path).read())
    assert reworded.count("# reworded: ") >= 100 and "# ---" not in reworded
    open(path, "w").write(reworded)
    assert load_definitions(path).GPT
    result = run_train(path, tiny_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "attention: sdpa | mlp: plain (no CUDA)" in result.stdout and "\nval_bpb:" in result.stdout


def test_end_to_end_run_prints_exact_summary(tiny_cache, tmp_path):
    result = run_train(train_copy(tmp_path), tiny_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "NOTE: NON-DEFAULT TIME_BUDGET=2s" in out and "NOTE: NON-DEFAULT EVAL_TOKENS=8,192" in out
    assert "no CUDA: small-machine settings" in out
    assert "attention: sdpa | mlp: plain (no CUDA) | loss: plain (no CUDA)" in out
    block = out[out.index("\n---\n") + 5 :].splitlines()
    assert [line.split(":")[0] for line in block] == SUMMARY_KEYS
    for line in block:
        key, value = line.split(":", 1)
        assert line.startswith(f"{key}:".ljust(18)) and value.strip() == value[18 - len(key) - 1 :]
    values = {line.split(":")[0]: line[18:] for line in block}
    assert re.fullmatch(r"\d+\.\d{6}", values["val_bpb"])
    assert values["mfu_percent"] == "n/a" and float(values["peak_vram_mb"]) > 0 and values["depth"] == "1"
    steps = int(values["num_steps"])
    assert steps > 1 and float(values["total_tokens_M"]) == pytest.approx(round(steps * 1024 / 1e6, 1))
    assert float(values["training_seconds"]) >= 2.0
    # better than a model that knows nothing: uniform over the vocabulary, log2(V) bits per token
    tok = prepare.Tokenizer.from_directory(str(tiny_cache / "tokenizer"))
    token_bytes = prepare.get_token_bytes("cpu", str(tiny_cache / "tokenizer"))
    rows = prepare.make_dataloader(tok, 2, prepare.SMALL_SEQ_LEN, "val", data_dir=str(tiny_cache / "data"))
    targets = torch.cat([next(rows)[1].reshape(-1) for _ in range(8192 // 1024)])
    nbytes = token_bytes[targets]
    uniform = math.log2(8192) * int((nbytes > 0).sum()) / int(nbytes.sum())
    assert float(values["val_bpb"]) < uniform


def test_missing_data_is_one_line(tmp_path):
    path = train_copy(tmp_path)
    result = run_train(path, tmp_path / "no-cache")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    tokenizer_dir = tmp_path / "no-cache" / "tokenizer"
    assert result.stderr.strip().splitlines() == [f"No tokenizer in {tokenizer_dir}: run `uv run prepare.py` first."]
