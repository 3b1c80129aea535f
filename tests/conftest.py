"""Shared fixtures: small synthetic climbmix-format shards, a tokenizer trained on them, the
real-text sample shards when the machine has them (AUTORESEARCH_SAMPLE_DATA), shrunk copies of
train.py, and Triton's interpreter on machines without a GPU."""

import os
import random
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prepare  # noqa: E402
from train_source import edit_code  # noqa: E402

# Without a GPU, Triton's CPU interpreter runs the fused MLP and loss kernels. It has to be switched on before
# triton is first imported (its standard library is compiled at import), so here, not in a fixture.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_interpreter():
    """For tests of the fused MLP and loss kernels: Triton's interpreter, on when there is no GPU.
    It cannot load bf16, so they run in float32; on a GPU, select_mlp and select_loss check the bf16
    kernels every run."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine): benchmarks/same_math.py checks the kernel there")


def sample_data_dir():
    """The real-text climbmix-format sample, where AUTORESEARCH_SAMPLE_DATA names its folder (.ci/run does)."""
    path = os.environ.get("AUTORESEARCH_SAMPLE_DATA")
    return path if path and os.path.exists(os.path.join(path, prepare.shard_name(prepare.VAL_SHARD))) else None


def synthetic_documents(n_docs, seed):
    """Pseudo-English documents: a Zipf-ish vocabulary of made-up words, punctuation, digits and
    some non-ASCII, varied lengths (a few long ones, so rows need cropping)."""
    rng = random.Random(seed)
    syllables = "ka lo mi tra ne sho vu pe ri dan el or qui zé ün st ph y".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    docs = []
    for _ in range(n_docs):
        n = rng.choice([rng.randint(3, 60), rng.randint(60, 400), rng.randint(400, 1500)])
        ws = rng.choices(words, weights, k=n)
        text = " ".join(w.capitalize() if rng.random() < 0.08 else w for w in ws)
        text = text.replace(" ka ", f" {rng.randint(0, 9999)}, ").replace(" lo ", ". ") + "."
        docs.append(text)
    return docs


def write_shard(path, docs, row_group_size=100):
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)


def make_shards(folder, n_train=3, docs_per_shard=500, val_docs=300, seed=0, row_group_size=100):
    os.makedirs(folder, exist_ok=True)
    for i in range(n_train):
        write_shard(os.path.join(folder, prepare.shard_name(i)), synthetic_documents(docs_per_shard, seed + i),
                    row_group_size)
    val = os.path.join(folder, prepare.shard_name(prepare.VAL_SHARD))
    write_shard(val, synthetic_documents(val_docs, seed + 999), row_group_size)
    return folder


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A prepared cache (data/ + tokenizer/) from synthetic shards, built with prepare's own code."""
    root = tmp_path_factory.mktemp("cache")
    make_shards(str(root / "data"))
    prepare.train_tokenizer(str(root / "data"), str(root / "tokenizer"))
    return root


SMALL_MACHINE_LINE = "    DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 4, 8, 2**13\n"  # in train.py's Setup
SMALL_SEQ_TOKENS = 2 * prepare.SMALL_SEQ_LEN  # the tiny copies' tokens per step: two sequences


def train_copy(folder, device_batch=2, edits=(), tail=""):
    """train.py in folder, beside a copy of prepare.py (which it imports): its small-machine line
    shrunk to one layer and two sequences a step, in micro-batches of device_batch rows; each (old,
    new) of edits is train_source.edit_code's (lines of code, comments ignored); tail is appended
    after the summary."""
    source = open(os.path.join(ROOT, "train.py")).read()
    tiny = f"    DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 1, {device_batch}, {SMALL_SEQ_TOKENS}\n"
    for old, new in [(SMALL_MACHINE_LINE, tiny), *edits]:
        source = edit_code(source, old, new)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "prepare.py"), folder)
    path = os.path.join(folder, "train.py")
    with open(path, "w") as f:
        f.write(source + tail)
    return path


@pytest.fixture
def use_cache(tiny_cache, monkeypatch):
    """Point prepare's module-level folders at the tiny cache for in-process tests."""
    monkeypatch.setattr(prepare, "CACHE_DIR", str(tiny_cache))
    monkeypatch.setattr(prepare, "DATA_DIR", str(tiny_cache / "data"))
    monkeypatch.setattr(prepare, "TOKENIZER_DIR", str(tiny_cache / "tokenizer"))
    monkeypatch.setattr(prepare, "TOKENS_DIR", str(tiny_cache / "tokens"))
    return tiny_cache

