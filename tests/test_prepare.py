"""prepare.py: tokenizer, packing, metric, attention and platform helpers, on real code paths."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare
from conftest import ROOT, make_shards, sample_data_dir, synthetic_documents, write_shard
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


def test_training_text_names_a_row_that_is_not_text(tmp_path):
    """A shard put into the cache by hand, its rows never checked: one line naming it and the row."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_shard(str(folder / "shard_00000.parquet"), ["a", "b", "c", None, "e"], row_group_size=2)
    with pytest.raises(prepare.NotReady, match=r"shard_00000\.parquet: row 3 holds None, not text: delete it"):
        list(prepare.tokenizer_training_text(prepare.list_shards("train", str(folder))))


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
    with pytest.raises(prepare.NotReady, match="No validation shard"):
        prepare.train_tokenizer(str(data), str(tmp_path / "tok"))
    make_shards(str(tmp_path / "d2"), n_train=0, val_docs=20)
    with pytest.raises(prepare.NotReady, match="No training shard"):
        prepare.train_tokenizer(str(tmp_path / "d2"), str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()  # nothing half-written


def test_missing_tokenizer_is_one_clear_line(tmp_path):
    with pytest.raises(prepare.NotReady) as e:
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
    with pytest.raises(prepare.NotReady, match="No training shard"):
        next(prepare.make_dataloader(tok, 2, 32, "train", data_dir=str(tmp_path / "empty")))
    write_shard(str(tmp_path / "empty" / "shard_00000.parquet"), [])
    with pytest.raises(prepare.NotReady, match="No documents in"):
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
    rows = eval_tokens // T  # 9: four batches of two, and a fifth whose second row is left out
    # by hand: the same val rows from the naive reading, byte counts straight from the vocabulary
    naive = naive_batches(tok, prepare.list_shards("val"), 1, T, 1000)
    targets = [t for _ in range(rows) for t in next(naive)[0][0][1:]]
    assert len(targets) == rows * T
    nbytes = [len(tok.enc.decode_single_token_bytes(t)) if t < 8188 else 0 for t in targets]
    assert 0 in nbytes  # BOS targets are there and must be left out
    exact = sum((t % 7) / 4 for t, b in zip(targets, nbytes) if b > 0) / (math.log(2) * sum(nbytes))
    assert prepare.evaluate_bpb(KnownLoss(8192, by_target=True), tok, B) == pytest.approx(exact, rel=1e-12)
    uniform = math.log(8192) * sum(1 for b in nbytes if b > 0) / (math.log(2) * sum(nbytes))
    got = prepare.evaluate_bpb(KnownLoss(8192), tok, B)
    assert got == pytest.approx(uniform, rel=1e-6)  # float32 cross-entropy of ln 8192
    assert prepare.evaluate_bpb(KnownLoss(8192), tok, B) == got  # deterministic


class PairLoss(nn.Module):
    """A small deterministic model: each token's loss is softplus(a[input] - b[target]), float64 weights
    from a seeded generator. It records the shape of every batch it is called with."""

    def __init__(self, vocab):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = (nn.Parameter(torch.rand(vocab, generator=g, dtype=torch.float64)) for _ in range(2))
        self.shapes = []

    def forward(self, x, y, reduction="mean"):
        self.shapes.append(tuple(x.shape))
        return F.softplus(self.a[x] - self.b[y]).reshape(-1)


def test_evaluation_is_the_same_rows_whatever_the_batch_size(use_cache, monkeypatch):
    """The CPU settings: 65,536 tokens = 128 rows of 512. Batches of 128, 48 (the last one 32 rows used)
    and 7 (the last one 2 used), and 200 (one batch, 128 used) all evaluate exactly those rows, in full
    batches only (a compiled model never sees another shape), and agree with a float64 sum over the same
    rows computed here: the naive packing, numpy's softplus, byte counts straight from the vocabulary."""
    monkeypatch.delenv("AUTORESEARCH_EVAL_TOKENS", raising=False)
    tok = prepare.Tokenizer.from_directory()
    T, eval_tokens = prepare.eval_settings(torch.device("cpu"))
    assert (T, eval_tokens) == (512, 65_536)
    model = PairLoss(tok.get_vocab_size())
    a, b = model.a.detach().numpy(), model.b.detach().numpy()
    rows = next(naive_batches(tok, prepare.list_shards("val"), 128, T, 1000))[0]
    nats, nbytes = [], 0
    for row in rows:
        for x, y in zip(row[:-1], row[1:]):
            width = len(tok.enc.decode_single_token_bytes(y)) if y < 8188 else 0
            if width:
                nats.append(np.logaddexp(0.0, a[x] - b[y]))
            nbytes += width
    exact = math.fsum(nats) / (math.log(2) * nbytes)
    for batch_size in (128, 48, 7, 200):
        model.shapes.clear()
        assert prepare.evaluate_bpb(model, tok, batch_size) == pytest.approx(exact, rel=1e-12), batch_size
        assert model.shapes == [(batch_size, T)] * -(-128 // batch_size)
    # the GPU settings: 20,971,520 tokens are 80 full batches of 128 rows of 2048, as before padding
    assert prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN == 80 * 128


def test_a_long_evaluation_shows_progress(use_cache, monkeypatch, capsys):
    """A small machine's evaluation takes long enough to look hung: past progress_after seconds
    it says where it is, at most every tenth of the batches and at the last one."""
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "20480")
    tok = prepare.Tokenizer.from_directory()
    quiet = prepare.evaluate_bpb(KnownLoss(8192), tok, 2)
    assert capsys.readouterr().out == ""
    assert prepare.evaluate_bpb(KnownLoss(8192), tok, 2, progress_after=0) == quiet
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" batches")[0] for line in lines] == [f"evaluation: {i}/20" for i in range(2, 21, 2)]


# ---------------------------------------------------------------------------
# Platform


def test_peak_flops_table():
    assert prepare.peak_flops_of("NVIDIA H100 80GB HBM3") == 989.5e12
    assert prepare.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert prepare.peak_flops_of("NVIDIA GH200 480GB") == prepare.peak_flops_of("NVIDIA H200") == 989.5e12
    assert prepare.peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert prepare.peak_flops_of("Some Future GPU") is None
    assert prepare.peak_flops(torch.device("cpu")) is None


def test_peak_memory_on_the_cpu_is_the_process_peak():
    """results.tsv reads a memory of 0.0 as a crash: a CPU run reports its peak resident memory. An array
    larger than the peak so far, written through, sets a new one: at least its size, at most the two."""
    code = ("import numpy, torch, prepare; cpu = torch.device('cpu'); before = prepare.peak_memory_mb(cpu); "
            "array = numpy.ones(int(before + 256) * 2**17); print(before, prepare.peak_memory_mb(cpu))")  # MiB
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    before, after = map(float, result.stdout.split())
    assert before > 50 and before + 256 <= after <= 2 * before + 300, (before, after)


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
