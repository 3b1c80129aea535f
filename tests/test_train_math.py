"""train.py's mathematics against independent expectations: float64 re-derivations of the published
formulas (Muon with Polar Express and NorMuon, cautious weight decay) written out here, published
identities, and torch.optim.AdamW. Never against train.py's own output. The schedules as the training
loop applies them, and gradient accumulation, are checked on real runs of the script in
test_train_run.py."""

import pytest
import torch
import torch.nn.functional as F

import prepare
from train_source import load_definitions


@pytest.fixture(scope="module")
def tr():
    return load_definitions()


def tiny_model(tr, attention=None, seed=0, **config):
    """train.py's GPT at a tiny size, initialised as train.py does, with `attention` (default:
    prepare's sdpa) as its attention function. The one place in this file that knows how the
    model is built."""
    sizes = dict(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(seed)
    attention = attention or prepare.make_attention("sdpa", torch.device("cpu"), 64)
    model = tr.GPT(tr.GPTConfig(**{**sizes, **config}), attention)
    model.init_weights()
    return model


def recording(attention, calls):
    """attention that also appends each call's (q, k, v, window) to calls."""

    def attend(q, k, v, window):
        calls.append((q, k, v, window))
        return attention(q, k, v, window)

    return attend


# ---------------------------------------------------------------------------
# Muon, re-derived in float64 from the formulas as published

# (a, b, c) of the five Polar Express steps, as published
PUBLISHED_POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express_f64(g):
    """The spec's iteration, through the identity that makes it work: with X = U S V^T, both
    aX + X(bA + cA^2) (A = X^T X) and aX + (bA + cA^2)X (A = X X^T) equal U (aS + bS^3 + cS^5) V^T.
    So the five steps are five odd polynomials applied to X's singular values, X = g/(|g|_F*1.02 + 1e-6)."""
    g = g.double()
    U, s, Vh = torch.linalg.svd(g, full_matrices=False)
    s = s / (g.norm(dim=(-2, -1)) * 1.02 + 1e-6)[..., None]
    for a, b, c in PUBLISHED_POLAR_EXPRESS:
        s = a * s + b * s**3 + c * s**5
    return U @ torch.diag_embed(s) @ Vh


def muon_step_f64(P, G, buf, second, lr, mu, beta2, wd):
    """One Muon step of stacked matrices, each line a step of the spec, in float64.
    Returns the new (P, buf, second)."""
    P, G, buf, second = (t.double() for t in (P, G, buf, second))
    buf = buf + (1 - mu) * (G - buf)  # buf <- lerp(buf, g, 1 - mu)
    g = G + mu * (buf - G)  # Nesterov: g <- lerp(g, buf, mu)
    X = polar_express_f64(g)
    rows, cols = X.shape[-2:]
    second = second + (1 - beta2) * ((X**2).mean(dim=-1 if rows >= cols else -2, keepdim=True) - second)
    Y = X / second.clamp_min(1e-10).sqrt()
    Y = Y * X.norm(dim=(-2, -1), keepdim=True) / Y.norm(dim=(-2, -1), keepdim=True)  # back to X's norm
    P = P - lr * Y - lr * wd * P * (Y * P >= 0)
    return P, buf, second


def random_muon_state(n, rows, cols, seed):
    """Weights, a nonzero momentum buffer and a positive second-moment buffer, as after some steps
    (from zero buffers the first step hides Nesterov: the blend is then a multiple of g)."""
    gen = torch.Generator().manual_seed(seed)
    P = torch.randn(n, rows, cols, generator=gen)
    buf = torch.randn(n, rows, cols, generator=gen)
    second_shape = (n, rows, 1) if rows >= cols else (n, 1, cols)
    second = torch.rand(second_shape, generator=gen) / rows + 1e-3
    grads = [torch.randn(n, rows, cols, generator=gen) for _ in range(3)]
    return P, buf, second, grads


def test_polar_express_applies_the_spec_polynomials_to_singular_values(tr):
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 32, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=gen))
    g = U @ torch.diag(torch.logspace(-3, 0, 32, dtype=torch.float64)) @ V.T  # singular values 1e-3 .. 1
    for matrix in (g, g.T):  # tall and wide take different branches to the same result
        got = tr.polar_express(matrix.float()).double()
        expected = polar_express_f64(matrix)
        assert (got - expected).abs().max().item() < 2e-5  # float32 against float64: measured 2.5e-6


def test_polar_express_makes_a_random_matrix_nearly_orthogonal(tr):
    g = torch.randn(3, 256, 192, generator=torch.Generator().manual_seed(0))
    s_in = torch.linalg.svdvals(g)
    assert (s_in.max(-1).values / s_in.min(-1).values).min() > 5  # singular values widely spread
    for matrix in (g, g.mT):
        s = torch.linalg.svdvals(tr.polar_express(matrix).float())
        assert s.min() > 0.7 and s.max() < 1.2, (s.min(), s.max())


@pytest.mark.parametrize("rows, cols", [(32, 16), (16, 32), (24, 24)], ids=["tall", "wide", "square"])
def test_muon_update_matches_the_spec_rederived_in_float64(tr, rows, cols):
    """Three steps from a nonzero state: momentum and Nesterov blend, Polar Express, NorMuon
    (per row when rows >= cols, else per column), cautious weight decay."""
    P, buf, second, grads = random_muon_state(3, rows, cols, seed=rows + cols)
    params = list(P.clone().unbind(0))
    ref = (P, buf.clone(), second.clone())
    lr, mu, beta2, wd = 0.02, 0.9, 0.95, 0.5
    for G in grads:
        tr.muon_update(params, list(G.unbind(0)), buf, second, lr, mu, beta2, wd)
        P_ref, buf_ref, second_ref = ref = muon_step_f64(ref[0], G, ref[1], ref[2], lr, mu, beta2, wd)
        assert torch.allclose(buf.double(), buf_ref, rtol=1e-6, atol=1e-6)
        assert torch.allclose(second.double(), second_ref, rtol=1e-4, atol=1e-9)
        gap = (torch.stack(params).double() - P_ref).abs().max().item()
        assert gap < 4e-6, gap  # entries move by ~lr = 0.02; float32 against float64 measured 4e-7


def test_muon_momentum_is_nesterov(tr):
    """The direction that is orthogonalized is lerp(g, lerp(buf, g, 1-mu), mu), not g and not the
    buffer itself: its update differs clearly from both of those."""
    P, buf, second, (G, *_) = random_muon_state(2, 32, 16, seed=1)
    params = list(P.clone().unbind(0))
    lr, mu = 0.02, 0.9
    tr.muon_update(params, list(G.unbind(0)), buf.clone(), second.clone(), lr, mu, 0.95, 0.0)
    update = (P - torch.stack(params)).double() / lr
    new_buf = buf + (1 - mu) * (G - buf)
    for direction, should_match in ((G + mu * (new_buf - G), True), (G, False), (new_buf, False)):
        # with zero decay, the update is the NorMuon-scaled Polar Express of the direction; give the
        # reference the state's buffers, with a momentum of 0 so it takes the direction as it is
        start = torch.zeros_like(P), direction, torch.zeros_like(buf)
        expected = muon_step_f64(*start, second, 1.0, 0.0, 0.95, 0.0)[0].neg()
        assert torch.allclose(update, expected, atol=1e-4) == should_match


def test_normuon_keeps_the_frobenius_norm_of_the_orthogonalized_update(tr):
    for rows, cols in ((32, 16), (16, 32)):
        P, buf, second, (G, *_) = random_muon_state(2, rows, cols, seed=2)
        params = list(P.clone().unbind(0))
        lr, mu, beta2 = 0.01, 0.9, 0.95
        second_before = second.clone()
        tr.muon_update(params, list(G.unbind(0)), buf.clone(), second, lr, mu, beta2, 0.0)
        X = polar_express_f64(G + mu * (buf + (1 - mu) * (G - buf) - G))
        update = (P - torch.stack(params)).double() / lr
        assert torch.allclose(update.norm(dim=(-2, -1)), X.norm(dim=(-2, -1)), rtol=1e-5)
        # the second moment is per row of a tall matrix, per column of a wide one, lerped with 1 - beta2
        mean_sq = (X**2).mean(dim=-1 if rows >= cols else -2, keepdim=True)
        assert second.shape == mean_sq.shape
        assert torch.allclose(second.double(), second_before + (1 - beta2) * (mean_sq - second_before), rtol=1e-4)
        # and the update is X scaled by rsqrt of it, then brought back to X's norm
        Y = X * second.double().rsqrt()
        rescaled = Y * X.norm(dim=(-2, -1), keepdim=True) / Y.norm(dim=(-2, -1), keepdim=True)
        assert torch.allclose(update, rescaled, atol=1e-4)  # float32 weights: ~1e-5


def test_cautious_weight_decay_only_where_update_and_weight_agree_in_sign(tr):
    """p <- p - lr*X - lr*wd*p*[X*p >= 0]: the same step with and without decay differs by exactly
    lr*wd*p where X*p >= 0 and by nothing elsewhere (X read off the step without decay)."""
    P, buf, second, (G, *_) = random_muon_state(2, 32, 16, seed=3)
    lr, wd = 0.05, 0.4
    stepped = {}
    for decay in (0.0, wd):
        params = list(P.clone().unbind(0))
        tr.muon_update(params, list(G.unbind(0)), buf.clone(), second.clone(), lr, 0.9, 0.95, decay)
        stepped[decay] = torch.stack(params).double()
    X = (P.double() - stepped[0.0]) / lr
    agree = X * P.double() >= 0
    assert 0.3 < agree.double().mean() < 0.7  # both kinds of entries are there
    decay_taken = stepped[0.0] - stepped[wd]
    assert torch.allclose(decay_taken, lr * wd * P.double() * agree, atol=1e-6)


def test_muon_learning_rate_is_scaled_by_aspect_ratio(tr):
    """Through MuonAdamW.step: a group's matrices move by lr * max(1, rows/cols)^0.5 times the
    update (x2 for 64x16, x1 for 16x64 and 32x32), with the group's momentum, beta2 and decay."""
    gen = torch.Generator().manual_seed(4)
    for (rows, cols), scale in (((64, 16), 2.0), ((16, 64), 1.0), ((32, 32), 1.0)):
        params = [torch.nn.Parameter(torch.randn(rows, cols, generator=gen)) for _ in range(2)]
        grads = torch.randn(2, rows, cols, generator=gen)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = torch.stack([p.detach().clone() for p in params])
        group = dict(kind="muon", params=params, lr=0.03, momentum=0.9, beta2=0.95, weight_decay=0.1)
        tr.MuonAdamW([group], compile_math=False).step()
        second = torch.zeros((2, rows, 1) if rows >= cols else (2, 1, cols))
        expected = muon_step_f64(before, grads, torch.zeros_like(grads), second, 0.03 * scale, 0.9, 0.95, 0.1)[0]
        assert torch.allclose(torch.stack([p.detach() for p in params]).double(), expected, atol=2e-6), (rows, cols)


# ---------------------------------------------------------------------------
# AdamW groups against torch.optim.AdamW


def test_optimizer_groups_follow_the_spec(tr):
    """Block matrices go to Muon, grouped by shape (lr MATRIX_LR, momentum 0.95, beta2 0.95, decay
    WEIGHT_DECAY); everything else to AdamW, which steps as torch.optim.AdamW does with the spec's
    learning rates, betas and eps 1e-10, bias correction included."""
    assert (tr.EMBEDDING_LR, tr.UNEMBEDDING_LR, tr.MATRIX_LR, tr.SCALAR_LR) == (0.6, 0.004, 0.04, 0.5)
    assert (tr.WEIGHT_DECAY, tr.ADAM_BETAS) == (0.2, (0.8, 0.95))
    model = tiny_model(tr)
    opt = tr.build_optimizer(model, compile_math=False)
    blocks = set(model.transformer.h.parameters())
    for group in opt.param_groups:
        if group["kind"] == "muon":
            assert len({p.shape for p in group["params"]}) == 1
            assert (group["lr"], group["momentum"], group["beta2"], group["weight_decay"]) == (0.04, 0.95, 0.95, 0.2)
    muon = {p for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert muon == blocks

    scale = (64 / 768) ** -0.5  # model_dim 64
    spec = [  # (parameters, lr, betas)
        ([model.lm_head.weight], 0.004 * scale, (0.8, 0.95)),
        ([model.transformer.wte.weight, *model.value_embeds.parameters()], 0.6 * scale, (0.8, 0.95)),
        ([model.resid_lambdas], 0.5 * 0.01, (0.8, 0.95)),
        ([model.x0_lambdas], 0.5, (0.96, 0.95)),
    ]
    adamw = [p for g in opt.param_groups if g["kind"] == "adamw" for p in g["params"]]
    assert sorted(map(id, adamw)) == sorted(id(p) for params, _, _ in spec for p in params)
    assert {id(p) for p in adamw} | {id(p) for p in blocks} == {id(p) for p in model.parameters()}

    copies = {id(p): p.detach().clone().requires_grad_() for p in adamw}
    groups = [dict(params=[copies[id(p)] for p in params], lr=lr, betas=betas) for params, lr, betas in spec]
    ref = torch.optim.AdamW(groups, eps=1e-10, weight_decay=0.0)
    gen = torch.Generator().manual_seed(5)
    tiny = {id(model.resid_lambdas), id(model.x0_lambdas)}  # gradients near 0, as theirs at init: there eps matters
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * (1e-10 if id(p) in tiny else 1.0)
            if id(p) in copies:
                copies[id(p)].grad = p.grad.clone()
        opt.step()
        ref.step()
    for p in adamw:
        assert torch.allclose(p.detach(), copies[id(p)].detach(), rtol=1e-5, atol=1e-6), p.shape


# ---------------------------------------------------------------------------
# The model


def test_each_layer_mixes_the_normed_embedding_back_in(tr):
    """The input of block i is resid_lambdas[i] * (output of block i-1) + x0_lambdas[i] * x0, with
    x0 = rmsnorm(wte(idx)) (block -1's output: x0 itself)."""
    model = tiny_model(tr, n_layer=3)
    with torch.no_grad():
        model.resid_lambdas.copy_(torch.tensor([0.7, 1.3, 0.9]))
        model.x0_lambdas.copy_(torch.tensor([0.2, -0.5, 0.4]))
        for block in model.transformer.h:  # so that blocks are not the identity
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    inputs, outputs = [], []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
        block.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(idx)
        x0 = F.rms_norm(model.transformer.wte.weight[idx].double(), (64,))
    previous = x0
    for i in range(3):
        expected = model.resid_lambdas[i].item() * previous + model.x0_lambdas[i].item() * x0
        assert torch.allclose(inputs[i].double(), expected, atol=1e-5), i
        previous = outputs[i].double()


def test_value_embeddings_enter_v_through_a_gate_of_twice_sigmoid(tr):
    """On layers n_layer-1, n_layer-3, ... (counting back from the last), v = c_v(x) + 2*sigmoid(
    W x[..., :32]) * value_embedding(idx), per head; other layers use c_v(x) alone."""
    for n_layer in (1, 2, 3, 4):
        calls, attn_inputs = [], []
        attention = recording(prepare.make_attention("sdpa", torch.device("cpu"), 64), calls)
        model = tiny_model(tr, attention=attention, n_layer=n_layer)
        with_ve = sorted(range(n_layer - 1, -1, -2))
        assert sorted(int(k) for k in model.value_embeds.keys()) == with_ve
        assert [b.attn.ve_gate is not None for b in model.transformer.h] == [i in with_ve for i in range(n_layer)]
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.register_forward_pre_hook(lambda m, args: attn_inputs.append(args[0]))
                if block.attn.ve_gate is not None:
                    block.attn.ve_gate.weight.normal_(0, 1.0)  # zero at init: gates all exactly 1
            idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(7))
            model(idx)
        for i, block in enumerate(model.transformer.h):
            x = attn_inputs[i].double()
            v = (x @ block.attn.c_v.weight.double().T).view(2, 64, 2, 32)
            if i in with_ve:
                gate = 2 * torch.sigmoid(x[..., :32] @ block.attn.ve_gate.weight.double().T)  # (B, T, heads)
                v = v + gate[..., None] * model.value_embeds[str(i)].weight.double()[idx].view(2, 64, 2, 32)
            assert torch.allclose(calls[i][2].double(), v, atol=1e-5), (n_layer, i)


def test_logits_are_soft_capped_and_the_loss_is_their_cross_entropy(tr):
    """logits = 15*tanh(lm_head(norm(x))/15) in float32; the loss is the cross-entropy of those
    logits, 0 for targets -1 and averaged over the others."""
    model = tiny_model(tr)
    raw = []
    model.lm_head.register_forward_hook(lambda m, args, out: raw.append(out.detach()))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 5.0)  # logits of +-40 and more: the cap matters
        idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(8))
        logits = model(idx)
        targets = idx.roll(-1, dims=1)
        targets[:, -5:] = -1
        per_token = model(idx, targets, reduction="none")
        mean = model(idx, targets)
    assert raw[0].abs().max() > 40 and logits.dtype == torch.float32
    assert torch.allclose(logits.double(), 15 * torch.tanh(raw[0].double() / 15), atol=1e-5)
    assert logits.abs().max() <= 15
    expected = F.cross_entropy(logits.double().view(-1, 256), targets.view(-1), ignore_index=-1, reduction="none")
    assert torch.allclose(per_token.double(), expected, rtol=1e-5, atol=1e-5)
    assert (per_token.view(2, 64)[:, -5:] == 0).all()
    assert mean.item() == pytest.approx(expected.sum().item() / (2 * 59), rel=1e-5)


def test_mlp_is_relu_squared_with_four_times_the_width(tr):
    model = tiny_model(tr)
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_proj.weight.normal_(0, 0.1)
        assert mlp.c_fc.weight.shape == (256, 64) and mlp.c_proj.weight.shape == (64, 256)
        x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(9))
        hidden = (x.double() @ mlp.c_fc.weight.double().T).clamp_min(0) ** 2
        assert torch.allclose(mlp(x).double(), hidden @ mlp.c_proj.weight.double().T, atol=1e-5)


@pytest.mark.parametrize("pattern, n_layer", [("SSSL", 8), ("SSSL", 3), ("L", 2), ("S", 3), ("SL", 5)])
def test_attention_windows_follow_the_pattern_with_a_full_last_layer(tr, pattern, n_layer):
    """S is half the context, L all of it, the pattern repeats over layers, and the last layer is
    always L; each layer's attention is called with its window."""
    calls = []
    attention = recording(prepare.make_attention("sdpa", torch.device("cpu"), 64), calls)
    model = tiny_model(tr, attention=attention, n_layer=n_layer, window_pattern=pattern)
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long))
    expected = [{"S": 32, "L": 64}[pattern[i % len(pattern)]] for i in range(n_layer)]
    expected[-1] = 64
    assert [window for *_, window in calls] == expected
    per_layer = 12 * 2 * 32 * sum(expected)  # FLOPs per token of attention, 12 x heads x head_dim x window
    block_params = sum(p.numel() for p in model.transformer.h.parameters())
    assert model.num_flops_per_token() - 6 * block_params - 6 * 64 * 256 == per_layer
