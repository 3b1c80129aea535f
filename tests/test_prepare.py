"""prepare.py: tokenizer, packing, metric, attention and platform helpers, on real code paths."""

import json
import math
import os
import re
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare
from conftest import band_scores, flash_backward, flash_forward, make_shards, sample_data_dir, synthetic_documents, write_shard
from naive_packing import naive_batches

# ---------------------------------------------------------------------------
# Tokenizer


def test_training_text_order_and_caps(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_shard(str(folder / "shard_00001.parquet"), ["b" * 5, "c" * 12_000], row_group_size=1)
    write_shard(str(folder / "shard_00000.parquet"), ["a" * 3, "d" * 4], row_group_size=1)
    paths = prepare.list_shards("train", str(folder))
    docs = list(prepare.tokenizer_training_text(paths))
    # sorted file names, row groups and rows in order, each cut to 10,000 characters
    assert docs == ["a" * 3, "d" * 4, "b" * 5, "c" * 10_000]
    # stop right after the document that brings the running total to the limit
    assert list(prepare.tokenizer_training_text(paths, max_chars=8)) == ["a" * 3, "d" * 4, "b" * 5]
    assert list(prepare.tokenizer_training_text(paths, max_chars=7)) == ["a" * 3, "d" * 4]


def test_tokenizer_artefacts_are_safe_and_round_trip(tiny_cache):
    folder = tiny_cache / "tokenizer"
    assert sorted(os.listdir(folder)) == ["meta.json", "ranks.tiktoken", "token_bytes.npy"]
    # nothing that can run code when loaded: base64 text, JSON, and a .npy read without pickle
    first = (folder / "ranks.tiktoken").read_text().splitlines()[0].split()
    assert len(first) == 2 and first[1] == "0"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["pattern"] == prepare.SPLIT_PATTERN and meta["vocab_size"] == prepare.VOCAB_SIZE
    tok = prepare.Tokenizer.from_directory(str(folder))
    assert tok.get_vocab_size() == prepare.VOCAB_SIZE == 8192
    assert tok.get_bos_token_id() == 8188 == tok.enc.encode_single_token("<|reserved_0|>")
    text = "Zürich → 東京, naïve café 🚀 12345\n\ttabs"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, prepend="<|reserved_0|>") == [8188] + ids
    assert tok.encode([text, "ka lo"], prepend=8188) == [[8188] + ids, [8188] + tok.encode("ka lo")]
    # special-token text inside a document is ordinary text, never a control token
    assert 8188 not in tok.encode("<|reserved_0|>")


def test_token_bytes_count_raw_bytes(tiny_cache):
    tok = prepare.Tokenizer.from_directory(str(tiny_cache / "tokenizer"))
    token_bytes = prepare.get_token_bytes("cpu", str(tiny_cache / "tokenizer"))
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (8192,)
    assert token_bytes[8188:].tolist() == [0, 0, 0, 0]
    for text in ["zé ün qui", "東京 🚀 ∑", "plain ascii 123"]:
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    # the 256 single-byte tokens are 1 byte each, even those that are not valid UTF-8 alone
    single = [i for i in range(8188) if len(tok.enc.decode_single_token_bytes(i)) == 1]
    assert len(single) == 256 and set(token_bytes[single].tolist()) == {1}


def test_tokenizer_training_is_deterministic(tiny_cache, tmp_path):
    prepare.train_tokenizer(str(tiny_cache / "data"), str(tmp_path / "tok"))
    a = (tiny_cache / "tokenizer" / "ranks.tiktoken").read_bytes()
    assert (tmp_path / "tok" / "ranks.tiktoken").read_bytes() == a


def test_tokenizer_refuses_without_shards(tmp_path):
    data = tmp_path / "data"
    make_shards(str(data), n_train=1, docs_per_shard=50, val_docs=20)
    os.remove(data / prepare.shard_name(prepare.VAL_SHARD))
    with pytest.raises(SystemExit, match="No validation shard"):
        prepare.train_tokenizer(str(data), str(tmp_path / "tok"))
    make_shards(str(tmp_path / "d2"), n_train=0, val_docs=20)
    with pytest.raises(SystemExit, match="No training shard"):
        prepare.train_tokenizer(str(tmp_path / "d2"), str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()  # nothing half-written


def test_missing_tokenizer_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        prepare.Tokenizer.from_directory(str(tmp_path / "nothing"))
    assert "run `uv run prepare.py` first" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# Packing: the fast loader against the naive reading of the spec, batch for batch


@pytest.fixture
def packing_data(tmp_path, use_cache):
    """Small shards: row groups larger than 128 documents (so a row group is cut into several
    reads), short documents with many equal lengths (ties), and a few longer than a row."""
    folder = tmp_path / "pack"
    folder.mkdir()
    short = [d for d in synthetic_documents(3000, seed=5) if len(d) < 250][:300]
    assert len(short) == 300
    long_ = [d for d in synthetic_documents(40, seed=6) if len(d) > 1500][:6]
    write_shard(str(folder / "shard_00000.parquet"), short[:200] + long_[:3], row_group_size=170)
    write_shard(str(folder / "shard_00003.parquet"), short[200:260] + long_[3:], row_group_size=25)
    write_shard(str(folder / prepare.shard_name(prepare.VAL_SHARD)), short[260:], row_group_size=15)
    return str(folder)


@pytest.mark.parametrize("buffer_size", [1, 3, 16, 1000])
def test_packing_matches_naive_spec_reading(packing_data, buffer_size):
    tok = prepare.Tokenizer.from_directory()
    B, T = 3, 96
    for split, n in [("train", 60), ("val", 20)]:
        paths = prepare.list_shards(split, packing_data)
        fast = prepare.make_dataloader(tok, B, T, split, buffer_size=buffer_size, data_dir=packing_data)
        naive = naive_batches(tok, paths, B, T, buffer_size)
        epochs = set()
        for _ in range(n):
            x, y, epoch = next(fast)
            rows, naive_epoch = next(naive)
            rows = torch.tensor(rows)
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
            assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
            assert epoch == naive_epoch
            assert (x[:, 0] == tok.get_bos_token_id()).all()  # every row starts with BOS
            epochs.add(epoch)
        assert len(epochs) >= 2, "the test must cross an epoch boundary"


def test_cached_and_uncached_tokens_are_identical(packing_data, use_cache):
    tok = prepare.Tokenizer.from_directory()
    shutil.rmtree(prepare.TOKENS_DIR, ignore_errors=True)
    first = prepare.make_dataloader(tok, 4, 64, "val", buffer_size=5, data_dir=packing_data)
    uncached = [next(first)[0] for _ in range(30)]  # reads past the epoch: the cache is written
    cache_files = os.listdir(os.path.join(prepare.TOKENS_DIR, tok.fingerprint))
    assert cache_files == ["shard_06542.npz"]
    second = prepare.make_dataloader(tok, 4, 64, "val", buffer_size=5, data_dir=packing_data)
    assert all(torch.equal(a, next(second)[0]) for a in uncached)
    # a changed shard invalidates its cached tokens
    path = prepare.list_shards("val", packing_data)[0]
    assert prepare.load_tokenized(path, tok) is not None
    os.utime(path, ns=(1, 1))
    assert prepare.load_tokenized(path, tok) is None


def test_no_training_data_is_a_clear_error_not_an_endless_loop(tmp_path, use_cache):
    tok = prepare.Tokenizer.from_directory()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="No training shard"):
        next(prepare.make_dataloader(tok, 2, 32, "train", data_dir=str(tmp_path / "empty")))
    write_shard(str(tmp_path / "empty" / "shard_00000.parquet"), [])
    with pytest.raises(SystemExit, match="No documents in"):
        next(prepare.make_dataloader(tok, 2, 32, "train", data_dir=str(tmp_path / "empty")))


@pytest.mark.skipif(sample_data_dir() is None, reason="real-text sample shards not present (AUTORESEARCH_SAMPLE_DATA)")
def test_real_text_tokenizer_and_packing(tmp_path, monkeypatch):
    """On real English text: a tokenizer from one real shard, byte counts, and packing."""
    src = sample_data_dir()
    data = tmp_path / "data"
    data.mkdir()
    for name in ["shard_00000.parquet", prepare.shard_name(prepare.VAL_SHARD)]:
        shutil.copy(os.path.join(src, name), data / name)
    monkeypatch.setattr(prepare, "TOKENS_DIR", str(tmp_path / "tokens"))
    prepare.train_tokenizer(str(data), str(tmp_path / "tok"))
    tok = prepare.Tokenizer.from_directory(str(tmp_path / "tok"))
    token_bytes = prepare.get_token_bytes("cpu", str(tmp_path / "tok"))
    texts = prepare.pq.read_table(data / prepare.shard_name(prepare.VAL_SHARD)).column("text").to_pylist()[:200]
    ids = tok.encode(texts)
    assert [tok.decode(i) for i in ids] == texts
    assert sum(int(token_bytes[i].sum()) for i in ids) == sum(len(t.encode()) for t in texts)
    B, T = 4, 2048
    fast = prepare.make_dataloader(tok, B, T, "val", data_dir=str(data))
    naive = naive_batches(tok, prepare.list_shards("val", str(data)), B, T, 1000)
    for _ in range(3):
        x, _, _ = next(fast)
        assert torch.equal(x, torch.tensor(next(naive)[0])[:, :-1])


# ---------------------------------------------------------------------------
# Metric


class KnownLoss(nn.Module):
    """A 'model' whose per-token loss is known: uniform logits (ln V for every token), or, with
    by_target, exactly (target mod 7) / 4 nats, so that a loss paired with the wrong byte count
    or a wrongly masked token changes the result."""

    def __init__(self, vocab, by_target=False):
        super().__init__()
        self.vocab, self.by_target = vocab, by_target
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, y, reduction="mean"):
        if self.by_target:
            return (y.reshape(-1) % 7).float() / 4 + self.dummy
        logits = torch.zeros(y.numel(), self.vocab) + self.dummy
        return F.cross_entropy(logits, y.reshape(-1), reduction=reduction)


def test_evaluate_bpb_matches_hand_computation(use_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "5000")
    tok = prepare.Tokenizer.from_directory()
    B = 2
    T, eval_tokens = prepare.eval_settings(torch.device("cpu"))
    assert T == prepare.SMALL_SEQ_LEN and eval_tokens == 5000
    steps = eval_tokens // (B * T)
    # by hand: the same val rows from the naive reading, byte counts straight from the vocabulary
    naive = naive_batches(tok, prepare.list_shards("val"), B, T, 1000)
    targets = [t for _ in range(steps) for row in next(naive)[0] for t in row[1:]]
    assert len(targets) == steps * B * T
    nbytes = [len(tok.enc.decode_single_token_bytes(t)) if t < 8188 else 0 for t in targets]
    assert 0 in nbytes  # BOS targets are there and must be left out
    exact = sum((t % 7) / 4 for t, b in zip(targets, nbytes) if b > 0) / (math.log(2) * sum(nbytes))
    assert prepare.evaluate_bpb(KnownLoss(8192, by_target=True), tok, B) == pytest.approx(exact, rel=1e-12)
    uniform = math.log(8192) * sum(1 for b in nbytes if b > 0) / (math.log(2) * sum(nbytes))
    got = prepare.evaluate_bpb(KnownLoss(8192), tok, B)
    assert got == pytest.approx(uniform, rel=1e-6)  # float32 cross-entropy of ln 8192
    assert prepare.evaluate_bpb(KnownLoss(8192), tok, B) == got  # deterministic


# ---------------------------------------------------------------------------
# Attention backends against plain math with the band mask


def reference_attention(q, k, v, window):
    return torch.einsum("bhts,bshd->bthd", band_scores(q, k, window).softmax(-1), v.double())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on purpose: the CPU path
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [1, 16, 63, 64, 200])
def test_attention_backends_match_plain_math(backend, window):
    T = 64
    fn = prepare.make_attention(backend, torch.device("cpu"), T)
    g = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(2, T, 3, 32, generator=g) for _ in range(3))
    ref = reference_attention(q, k, v, window)
    out = fn(q, k, v, window)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("windows", [(32, 64), (16, 64)], ids=["default windows", "a new window"])
def test_attention_masks_do_not_recompile_a_compiled_model(backend, windows):
    """A mask cached from inside a compiled region changes what its guards saw: the whole model
    would compile twice (once in step 0's first micro-step, again in its second). Dynamo alone
    (backend="eager") shows it; flex runs forward only, as it has no CPU backward."""
    import torch._dynamo

    torch._dynamo.reset()
    attention = prepare.make_attention(backend, torch.device("cpu"), 64)
    q = torch.randn(1, 64, 2, 32, requires_grad=backend == "sdpa")
    model = torch.compile(lambda q: sum(attention(q, q, q, w) for w in windows), backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [model(q) for _ in range(3)]
        if q.requires_grad:
            outs[-1].sum().backward()
    expected = sum(reference_attention(q.detach(), q.detach(), q.detach(), w) for w in windows)
    assert ((outs[-1].detach().double() - expected).norm() / expected.norm()).item() <= 1e-5


def test_flash_attention_op_matches_sdpa_and_stays_whole_under_compile():
    """The torch.library wrapper that carries flash-attn-4 into compiled graphs (fake, autograd
    rule, layout), driven by float64 reference kernels since this machine has no GPU."""
    attention = prepare.flash_attention_op("reference", flash_forward, flash_backward)
    assert prepare.flash_attention_op("reference", flash_forward, flash_backward) is attention  # registered once
    sdpa = prepare.make_attention("sdpa", torch.device("cpu"), 64)
    compiled = torch.compile(attention, fullgraph=True)  # a graph break inside would raise here
    g = torch.Generator().manual_seed(0)
    for window in (1, 16, 63):
        q, k, v, dout = (torch.randn(2, 64, 3, 32, generator=g) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        results = {}
        for name, fn in (("sdpa", sdpa), ("op", attention), ("compiled op", compiled)):
            out = fn(q, k, v, window)
            results[name] = [out, *torch.autograd.grad(out, (q, k, v), dout)]
        for name in ("op", "compiled op"):
            for got, ref in zip(results[name], results["sdpa"]):
                assert got.shape == ref.shape and got.dtype == torch.float32
                assert ((got - ref).norm() / ref.norm()).item() <= 1e-5, (name, window)
    torch.library.opcheck(torch.ops.autoresearch.reference_fwd.default, (q, k, v, 16))  # fake and autograd agree


def test_select_attention_on_cpu_is_sdpa(monkeypatch, capsys):
    name, fn = prepare.select_attention(torch.device("cpu"), 64)
    assert name == "sdpa"
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "fa3")  # asked for, but impossible here: said, then SDPA
    name, fn = prepare.select_attention(torch.device("cpu"), 64)
    assert name == "sdpa" and "attention: fa3 unavailable (Flash-Attention-3 needs CUDA)" in capsys.readouterr().out
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "fa4")
    name, fn = prepare.select_attention(torch.device("cpu"), 64)
    assert name == "sdpa" and "attention: fa4 unavailable (flash-attn-4 needs a Hopper or Blackwell" in capsys.readouterr().out
    # FlexAttention's forward runs on a CPU but its backward does not: the gradient check catches it
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "flex")
    name, fn = prepare.select_attention(torch.device("cpu"), 64, head_dim=32)
    assert name == "sdpa" and "attention: flex unavailable (FlexAttention does not support backward on CPU" in capsys.readouterr().out


def test_fused_mlp_matches_plain_pytorch_and_stays_whole_under_compile(triton_interpreter):
    g = torch.Generator().manual_seed(0)
    M, C, H = 70, 48, 96  # no multiple of the kernel's blocks (64 x 64 x 32 here): the edges are masked; forward: 4 tiles on 3 programs, two of which step past the end
    x, dout = torch.randn(M, C, generator=g), torch.randn(M, C, generator=g)
    w_fc, w_proj = torch.randn(H, C, generator=g) / 7, torch.randn(C, H, generator=g) / 10
    op = prepare.relu_squared_mlp_op()
    out, post = op(x, w_fc, w_proj)
    expected = (x @ w_fc.T).relu().square()  # kept for the backward: its weight gradient and sqrt(post) = relu(h)
    assert ((post - expected).abs().max() / expected.max()).item() < 1e-6 and (post[expected == 0] == 0).all()
    compiled = torch.compile(prepare.relu_squared_mlp_fused, fullgraph=True)  # a graph break would raise here
    results = {}
    for name, fn in (("plain", prepare.relu_squared_mlp_plain), ("fused", prepare.relu_squared_mlp_fused), ("compiled", compiled)):
        leaves = [t.clone().requires_grad_() for t in (x.view(2, 35, C), w_fc, w_proj)]
        out = fn(*leaves)
        results[name] = [out, *torch.autograd.grad(out, leaves, dout.view(2, 35, C))]
    for name in ("fused", "compiled"):
        for got, ref in zip(results[name], results["plain"]):
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert ((got - ref).norm() / ref.norm()).item() <= 1e-6, name
    torch.library.opcheck(op, (x, w_fc.requires_grad_(), w_proj))  # fake and autograd agree with the kernel


def test_fused_loss_matches_plain_pytorch_and_stays_whole_under_compile(triton_interpreter):
    g = torch.Generator().manual_seed(0)
    N, C, V = 70, 24, 300  # the vocabulary is no multiple of the kernel's chunk (128 here): the last one is masked
    x, w_head = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)  # logits of ~5: past the cap's linear part
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -1  # ignored: no loss, no gradient
    dlosses = torch.rand(N, generator=g)  # a different weight per token: the backward must apply each to its row
    op = prepare.softcap_cross_entropy_op()
    losses, dlogits = op(x, w_head, targets, 15.0, True)
    assert dlogits.shape == (N, V) and not dlogits[::7].any()
    compiled = torch.compile(prepare.softcap_cross_entropy_fused, fullgraph=True)  # a graph break would raise here
    results = {}
    for name, fn in (("plain", prepare.softcap_cross_entropy_plain), ("fused", prepare.softcap_cross_entropy_fused), ("compiled", compiled)):
        leaves = [x.view(2, 35, C).clone().requires_grad_(), w_head.clone().requires_grad_()]
        losses = fn(*leaves, targets.view(2, 35), 15.0)
        results[name] = [losses, *torch.autograd.grad(losses, leaves, dlosses)]
    assert results["plain"][0].shape == (N,) and (results["plain"][0][::7] == 0).all()
    for name in ("fused", "compiled"):
        for got, ref in zip(results[name], results["plain"]):
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert ((got - ref).norm() / ref.norm()).item() <= 1e-6, name
    with torch.no_grad():  # evaluation: the losses only, no gradient written
        assert (prepare.softcap_cross_entropy_fused(x, w_head, targets, 15.0) - results["plain"][0]).abs().max() < 1e-5
        assert op(x, w_head, targets, 15.0, False)[1].numel() == 0
    torch.library.opcheck(op, (x, w_head.requires_grad_(), targets, 15.0, True))  # fake and autograd agree with the kernel


def test_start_up_check_refuses_a_kernel_that_disagrees():
    """The check select_attention, select_mlp and select_loss run on a GPU before using a fast kernel."""
    ref = [torch.ones(4, 8), torch.full((3,), 2.0)]
    prepare._check_close([r * 1.01 for r in ref], ref, "plain PyTorch")  # within 2%: passes
    with pytest.raises(RuntimeError, match=r"^output or gradient differs from SDPA \(relative error 0\.05\)$"):
        prepare._check_close([ref[0], ref[1] * 1.05], ref, "SDPA")
    with pytest.raises(RuntimeError, match="relative error nan"):
        prepare._check_close([ref[0] * float("nan")], ref[:1], "SDPA")  # NaN fails too
    assert prepare._reason(RuntimeError("first line\nmore")) == "first line" and prepare._reason(MemoryError()) == "MemoryError"


def test_fused_path_check_takes_a_kernel_that_agrees_and_refuses_others(capsys):
    """select_mlp's and select_loss's check (_select_fused), with stand-in kernels: on a GPU it
    runs the real ones, which Triton's CPU interpreter cannot run in bf16."""
    cpu = torch.device("cpu")

    def inputs(g):
        x, w = torch.randn(4, 8, generator=g).requires_grad_(), torch.randn(3, 8, generator=g).requires_grad_()
        return (x, w), (x, w), torch.ones(4, 3)

    def plain(x, w):
        return F.linear(x, w)

    registered = []
    assert prepare._select_fused("mlp", cpu, F.linear, plain, lambda: registered.append(True), inputs) == ("triton", F.linear)
    assert registered == [True] and capsys.readouterr().out == ""
    assert prepare._select_fused("mlp", cpu, lambda x, w: plain(x, w) * 1.05, plain, lambda: None, inputs) == ("plain", plain)
    out = capsys.readouterr().out  # 5% off, give or take bf16 rounding
    assert re.fullmatch(r"mlp: fused kernel unavailable \(output or gradient differs from plain PyTorch \(relative error 0\.0(49|5|51)\d*\)\)\n", out), out

    def no_triton():
        raise ImportError("No module named 'triton'")

    assert prepare._select_fused("loss", cpu, F.linear, plain, no_triton, inputs) == ("plain", plain)
    assert capsys.readouterr().out == "loss: fused kernel unavailable (No module named 'triton')\n"


def test_select_mlp_and_loss_off_cuda_are_plain_pytorch():
    assert prepare.select_mlp(torch.device("cpu")) == ("plain", prepare.relu_squared_mlp_plain)
    assert prepare.select_loss(torch.device("cpu")) == ("plain", prepare.softcap_cross_entropy_plain)


def test_hub_lookup_fails_fast_offline(monkeypatch):
    import socket
    import time

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: the connection is refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.time()
    assert prepare._hub_reachable() is False
    # a name lookup that hangs is cut off at the timeout too
    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("name lookup timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    assert prepare._hub_reachable(timeout=0.5) is False
    assert time.time() - t0 < 3


# ---------------------------------------------------------------------------
# Platform


def test_peak_flops_table():
    assert prepare.peak_flops_of("NVIDIA H100 80GB HBM3") == 989.5e12
    assert prepare.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert prepare.peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert prepare.peak_flops_of("Some Future GPU") is None
    assert prepare.peak_flops(torch.device("cpu")) is None


def test_run_settings_report_every_override(monkeypatch):
    for var in ["AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS", "AUTORESEARCH_CACHE"]:
        monkeypatch.delenv(var, raising=False)
    cpu = torch.device("cpu")
    seq_len, budget, notes = prepare.run_settings(cpu)
    assert (seq_len, budget) == (512, 300)
    assert len(notes) == 1 and "NOT comparable" in notes[0]
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "7")
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
    seq_len, budget, notes = prepare.run_settings(cpu)
    assert budget == 7 and prepare.eval_settings(cpu)[1] == 4096
    assert any("TIME_BUDGET=7" in n for n in notes) and any("EVAL_TOKENS=4,096" in n for n in notes)


def test_fixed_constants():
    assert prepare.MAX_SEQ_LEN == 2048 and prepare.TIME_BUDGET == 300
    assert prepare.EVAL_TOKENS == 20_971_520 and prepare.VOCAB_SIZE == 8192
    assert prepare.VAL_SHARD == 6542 and prepare.shard_name(6542) == "shard_06542.parquet"
    assert prepare.base_url().endswith("/datasets/karpathy/climbmix-400b-shuffle/resolve/main")
