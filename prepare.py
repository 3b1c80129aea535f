"""
autoresearch, the fixed half: data, tokenizer, dataloader, metric and platform plumbing.

    uv run prepare.py                      # 10 training shards + the validation shard, tokenizer
    uv run prepare.py --num-shards 100     # more data (-1 = all 6542 training shards)
    uv run prepare.py --source-dir /data   # copy shards from a local folder instead of downloading

Everyone's val_bpb is comparable only because everyone downloads the same shards, trains the same
tokenizer, packs the same batches and computes the metric the same way. The agent never edits
this file; train.py imports the runtime utilities at the bottom.
"""

import argparse
import base64
import bisect
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq

# ---------------------------------------------------------------------------
# Fixed constants (the agent never changes these)

MAX_SEQ_LEN = 2048  # context length; also the evaluation length
TIME_BUDGET = 300  # seconds of timed training
EVAL_TOKENS = 40 * 524288  # validation tokens per evaluation
VOCAB_SIZE = 8192  # including the special tokens

DATASET = "karpathy/climbmix-400b-shuffle"
MAX_SHARD = 6542  # shards are shard_00000 ... shard_06542
VAL_SHARD = MAX_SHARD  # the last one: always downloaded, never trained on
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4's split pattern with numbers in groups of at most two
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_MAX_CHARS = 1_000_000_000  # characters of training text the tokenizer sees
TOKENIZER_DOC_CAP = 10_000  # each document is cut to its first 10,000 characters
DOCS_PER_READ = 128  # a row group is read in batches of this many documents
PRETOKENIZE_SHARDS = 16  # prepare tokenizes this many training shards ahead (more than a run eats)

# Without CUDA the figures above would make one experiment take hours: shorter sequences and a
# smaller evaluation. Such a val_bpb is NOT comparable with a GPU's.
SMALL_SEQ_LEN = 512
SMALL_EVAL_TOKENS = 2**16

CACHE_DIR = os.path.expanduser(os.environ.get("AUTORESEARCH_CACHE", "~/.cache/autoresearch"))
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
TOKENS_DIR = os.path.join(CACHE_DIR, "tokens")  # tokenized shards, so later passes skip BPE


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def base_url():
    # HF_ENDPOINT is the standard way to name a Hugging Face mirror (behind a firewall or proxy)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/{DATASET}/resolve/main"


# ---------------------------------------------------------------------------
# Shards: download or copy, atomically, and check them


def shard_is_valid(path):
    """A shard is usable when its parquet footer reads and it has a text column with rows.
    A truncated file (crash mid-copy, full disk) fails here because the footer is at the end."""
    try:
        meta = pq.ParquetFile(path).metadata
        return meta.num_rows > 0 and "text" in meta.schema.names
    except Exception:
        return False


def _temp_path(path):
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def _remove_stale_temps(folder):
    """Temporary files of earlier runs that died (their process is gone) are deleted."""
    for name in os.listdir(folder):
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        try:
            pid = int(name.rsplit(".", 2)[1])
            os.kill(pid, 0)
            continue  # that run is still going
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass


def fetch_shard(index, data_dir, source_dir=None, attempts=5, backoff=2.0, log=print):
    """Put shard `index` into data_dir. Returns None on success, else a one-line reason.
    The file is written under a temporary name and renamed only once complete and valid."""
    import requests

    name = shard_name(index)
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        if shard_is_valid(path):
            return None
        log(f"{name}: present but truncated or not valid parquet, fetching it again")
        os.remove(path)
    tmp = _temp_path(path)
    if source_dir is not None:
        src = os.path.join(source_dir, name)
        if not os.path.exists(src):
            return f"not in {source_dir}"
        try:
            shutil.copyfile(src, tmp)
        except OSError as e:  # unreadable source, full disk: reported like a failed download
            if os.path.exists(tmp):
                os.remove(tmp)
            return f"cannot copy {src}: {str(e).splitlines()[0][:200]}"
        if not shard_is_valid(tmp):
            os.remove(tmp)
            return f"{src} is not valid parquet"
        os.replace(tmp, path)
        return None
    url = f"{base_url()}/{name}"
    reason = "no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=(10, 60)) as r:
                if r.status_code != 200:
                    reason = f"HTTP {r.status_code} from {url}"
                    # a 4xx other than timeouts / rate limits will not change on retry
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        return reason
                    raise OSError(reason)
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
            if not shard_is_valid(tmp):
                raise OSError("download is truncated or not valid parquet")
            os.replace(tmp, path)
            return None
        except Exception as e:  # network errors, truncated bodies, 5xx
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt < attempts:
                wait = backoff * 2 ** (attempt - 1)
                log(f"{name}: attempt {attempt}/{attempts} failed ({reason}); retrying in {wait:g}s")
                time.sleep(wait)
    return f"{reason} (after {attempts} attempts)"


def fetch_shards(indices, data_dir, workers=8, source_dir=None, backoff=2.0):
    """Fetch shards in parallel. Returns {index: reason} for the ones that could not be had."""
    os.makedirs(data_dir, exist_ok=True)
    _remove_stale_temps(data_dir)
    todo = [i for i in indices if not shard_is_valid(os.path.join(data_dir, shard_name(i)))]
    have = len(indices) - len(todo)
    src = f"from {source_dir}" if source_dir else f"from {base_url()}"
    print(f"data: {have}/{len(indices)} shards already in {data_dir}; fetching {len(todo)} {src}")
    failed, done, t0 = {}, 0, time.time()
    if not todo:
        return failed
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        futures = {i: pool.submit(fetch_shard, i, data_dir, source_dir, 5, backoff) for i in todo}
        try:
            for i, fut in futures.items():
                reason = fut.result()
                done += 1
                if reason:
                    failed[i] = reason
                    print(f"  {shard_name(i)}: FAILED: {reason}")
                else:
                    print(f"  {shard_name(i)}: ok ({done}/{len(todo)}, {time.time() - t0:.0f}s)")
        except BaseException:
            # Ctrl-C: leaving the block would otherwise wait for every queued download; only
            # those under way are finished (they land atomically), the rest are dropped
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return failed


def list_shards(split, data_dir=None):
    """Parquet files of a split, sorted by name. 'train' is every shard but the validation one."""
    data_dir = data_dir or DATA_DIR
    val = shard_name(VAL_SHARD)
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet")) if os.path.isdir(data_dir) else []
    names = [n for n in names if (n == val) == (split == "val")]
    if not names:
        what = "validation shard" if split == "val" else "training shard"
        raise SystemExit(f"No {what} in {data_dir}: run `uv run prepare.py` first.")
    return [os.path.join(data_dir, n) for n in names]


# ---------------------------------------------------------------------------
# Tokenizer: trained with rustbpe, stored as plain text + JSON (nothing that can run code on load)


def tokenizer_training_text(paths, max_chars=TOKENIZER_MAX_CHARS, doc_cap=TOKENIZER_DOC_CAP):
    """Documents in the pinned order: files sorted by name, row groups in order, rows in order;
    each cut to doc_cap characters; stop right after the one that reaches max_chars in total."""
    total = 0
    for path in paths:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = text[:doc_cap]
                total += len(doc)
                yield doc
                if total >= max_chars:
                    return


def build_encoding(mergeable_ranks, pattern=SPLIT_PATTERN):
    import tiktoken

    n = len(mergeable_ranks)
    specials = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="autoresearch", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=specials)


def token_byte_lengths(encoding):
    """UTF-8 length of each token's raw bytes; 0 for special tokens. (Decoding a token to str and
    re-encoding over-counts tokens that hold part of a multi-byte character.)"""
    special_ids = set(encoding._special_tokens.values())
    return np.array(
        [0 if i in special_ids else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)],
        dtype=np.int32,
    )


def train_tokenizer(data_dir=None, tokenizer_dir=None):
    """Train the BPE tokenizer on the training shards and save it atomically."""
    import rustbpe

    data_dir, tokenizer_dir = data_dir or DATA_DIR, tokenizer_dir or TOKENIZER_DIR
    list_shards("val", data_dir)  # both splits must exist, else a clear refusal
    train_paths = list_shards("train", data_dir)
    t0 = time.time()
    print(f"tokenizer: training on {len(train_paths)} shard(s), up to {TOKENIZER_MAX_CHARS:,} characters")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(tokenizer_training_text(train_paths), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
    encoding = build_encoding(ranks, trainer.get_pattern())
    if encoding.n_vocab != VOCAB_SIZE:
        raise SystemExit(f"tokenizer: got {encoding.n_vocab} tokens, expected {VOCAB_SIZE}: too little training text?")
    sample = "Hello world! Ünïcödé → 東京 🚀 naïve café, 12345 tabs\tand\nnewlines."
    if encoding.decode(encoding.encode_ordinary(sample)) != sample:
        raise SystemExit("tokenizer: round trip failed on non-ASCII text")
    save_tokenizer(ranks, trainer.get_pattern(), tokenizer_dir)
    print(f"tokenizer: {encoding.n_vocab} tokens, trained in {time.time() - t0:.1f}s, saved to {tokenizer_dir}")


def save_tokenizer(ranks, pattern, tokenizer_dir):
    """Write ranks (tiktoken's base64 text format), meta.json and token_bytes.npy into a temporary
    folder, then rename it into place: a tokenizer folder is either complete or absent."""
    encoding = build_encoding(ranks, pattern)
    parent = os.path.dirname(os.path.abspath(tokenizer_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = _temp_path(tokenizer_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "ranks.tiktoken"), "w") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"pattern": pattern, "special_tokens": SPECIAL_TOKENS, "vocab_size": encoding.n_vocab}, f, indent=1)
    np.save(os.path.join(tmp, "token_bytes.npy"), token_byte_lengths(encoding))
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    os.replace(tmp, tokenizer_dir)


class Tokenizer:
    """A tiktoken.Encoding over the trained ranks, with BOS and batch encoding."""

    def __init__(self, encoding, fingerprint=""):
        self.enc = encoding
        self.bos_token_id = encoding.encode_single_token(BOS_TOKEN)
        self.fingerprint = fingerprint  # names the token cache of this tokenizer

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
        ranks_path = os.path.join(tokenizer_dir, "ranks.tiktoken")
        if not os.path.exists(ranks_path):
            raise SystemExit(f"No tokenizer in {tokenizer_dir}: run `uv run prepare.py` first.")
        with open(ranks_path, "rb") as f:
            raw = f.read()
        with open(os.path.join(tokenizer_dir, "meta.json")) as f:
            meta = json.load(f)
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
        return cls(build_encoding(ranks, meta["pattern"]), hashlib.sha256(raw).hexdigest()[:16])

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Encode a string, or a list of strings as a batch (multi-threaded). `prepend` is a token
        id or a special-token string put in front of every document."""
        if isinstance(prepend, str):
            prepend = self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return ids if prepend is None else [[prepend] + row for row in ids]

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu", tokenizer_dir=None):
    import torch

    path = os.path.join(tokenizer_dir or TOKENIZER_DIR, "token_bytes.npy")
    if not os.path.exists(path):
        raise SystemExit(f"No tokenizer in {os.path.dirname(path)}: run `uv run prepare.py` first.")
    return torch.from_numpy(np.load(path, allow_pickle=False)).to(device)


# ---------------------------------------------------------------------------
# Tokenized shards: documents of one parquet file as one uint16 array (BOS in front of each), with
# document offsets and the number of documents per row group. Cached per tokenizer, so that epochs
# after the first, and evaluations, skip BPE entirely. Same tokens either way.


def _cache_path(path, tokenizer):
    folder = os.path.join(TOKENS_DIR, tokenizer.fingerprint)
    return os.path.join(folder, os.path.basename(path).replace(".parquet", ".npz"))


def _source_stamp(path):
    st = os.stat(path)
    return np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)


def load_tokenized(path, tokenizer):
    """Cached (tokens, offsets, rg_docs) of a shard, or None when absent or stale."""
    cache = _cache_path(path, tokenizer)
    try:
        with np.load(cache, allow_pickle=False) as z:
            if not np.array_equal(z["stamp"], _source_stamp(path)):
                return None
            return z["tokens"], z["offsets"], z["rg_docs"]
    except (OSError, KeyError, ValueError):
        return None


def save_tokenized(path, tokenizer, docs, rg_docs):
    """Store a shard's tokenized documents atomically; best effort (a read-only cache is fine)."""
    cache = _cache_path(path, tokenizer)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(docs).astype(np.uint16) if docs else np.zeros(0, np.uint16)
        tmp = _temp_path(cache)
        with open(tmp, "wb") as f:
            np.savez(f, tokens=tokens, offsets=offsets, rg_docs=np.array(rg_docs, np.int64), stamp=_source_stamp(path))
        os.replace(tmp, cache)
    except OSError:
        pass


def tokenize_shard(path, tokenizer, num_threads=8):
    docs, rg_docs = [], []
    pf = pq.ParquetFile(path)
    for rg in range(pf.num_row_groups):
        texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        ids = tokenizer.encode(texts, prepend=tokenizer.bos_token_id, num_threads=num_threads)
        docs.extend(np.array(d, dtype=np.uint16) for d in ids)
        rg_docs.append(len(texts))
    save_tokenized(path, tokenizer, docs, rg_docs)


def document_batches(tokenizer, paths):
    """Forever: (list of token arrays, epoch) per batch of up to DOCS_PER_READ documents, file by
    file, row group by row group; a batch never spans two row groups. epoch counts passes from 1."""
    epoch = 1
    while True:
        if epoch == 2 and not any(pq.ParquetFile(p).metadata.num_rows for p in paths):
            raise SystemExit(f"No documents in {', '.join(paths)}: run `uv run prepare.py` again.")
        for path in paths:
            cached = load_tokenized(path, tokenizer)
            if cached is not None:
                tokens, offsets, rg_docs = cached
                start = 0
                for n in rg_docs:
                    for lo in range(start, start + n, DOCS_PER_READ):
                        hi = min(lo + DOCS_PER_READ, start + n)
                        yield [tokens[offsets[j] : offsets[j + 1]] for j in range(lo, hi)], epoch
                    start += n
                continue
            # not cached yet: tokenize as we go, and store the shard once it has been read whole
            docs, rg_docs = [], []
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                rg_docs.append(len(texts))
                for lo in range(0, len(texts), DOCS_PER_READ):
                    ids = tokenizer.encode(texts[lo : lo + DOCS_PER_READ], prepend=tokenizer.bos_token_id)
                    batch = [np.array(d, dtype=np.uint16) for d in ids]
                    docs.extend(batch)
                    yield batch, epoch
            save_tokenized(path, tokenizer, docs, rg_docs)
        epoch += 1


# ---------------------------------------------------------------------------
# Dataloader: best-fit packing of BOS-aligned documents into rows, no padding


def pack_rows(tokenizer, T, split, buffer_size=1000, data_dir=None):
    """Forever: (row of T+1 tokens as int32 numpy, epoch). Before every placement the buffer is
    refilled to buffer_size documents. With r tokens of room: place the longest document that
    fits whole (earliest among equals); if none fits, the first r tokens of the shortest (earliest
    among equals), dropping its rest. Documents are kept in per-length queues (arrival order) and
    the distinct lengths in a sorted list, so each placement is a bisect instead of a scan."""
    source = document_batches(tokenizer, list_shards(split, data_dir))
    queues, lengths, count, epoch = {}, [], 0, 1
    row_len = T + 1
    while True:
        row = np.empty(row_len, dtype=np.int32)
        pos = 0
        while pos < row_len:
            while count < buffer_size:
                docs, epoch = next(source)
                for d in docs:
                    n = len(d)
                    q = queues.get(n)
                    if q is None:
                        q = queues[n] = deque()
                        bisect.insort(lengths, n)
                    q.append(d)
                count += len(docs)
            room = row_len - pos
            i = bisect.bisect_right(lengths, room) - 1
            n = lengths[i] if i >= 0 else lengths[0]
            q = queues[n]
            doc = q.popleft()
            if not q:
                del queues[n]
                lengths.pop(i if i >= 0 else 0)
            count -= 1
            take = min(n, room)
            row[pos : pos + take] = doc[:take]
            pos += take
        yield row, epoch


def make_dataloader(tokenizer, B, T, split, buffer_size=1000, data_dir=None):
    """Forever: (inputs, targets, epoch), inputs and targets B x T int64 on the training device.
    epoch is that of the most recent document batch read."""
    import torch

    assert split in ("train", "val"), split
    device = get_device()
    rows = pack_rows(tokenizer, T, split, buffer_size, data_dir)
    while True:
        batch = np.empty((B, T + 1), dtype=np.int32)
        for b in range(B):
            batch[b], epoch = next(rows)
        t = torch.from_numpy(batch)
        if device.type == "cuda":  # pinned, so the copy overlaps the GPU's work
            t = t.pin_memory().to(device, non_blocking=True)
        else:
            t = t.to(device)
        t = t.long()
        yield t[:, :-1], t[:, 1:], epoch


# ---------------------------------------------------------------------------
# Metric: bits per byte on the validation shard, independent of the vocabulary size


def evaluate_bpb(model, tokenizer, batch_size):
    """val_bpb = sum of per-token losses (nats) over targets that stand for bytes, divided by
    ln 2 times the number of those bytes. Fixed data, fixed token count: deterministic."""
    import torch

    device = next(model.parameters()).device
    seq_len, eval_tokens = eval_settings(device)
    token_bytes = get_token_bytes(device)
    loader = make_dataloader(tokenizer, batch_size, seq_len, "val")
    steps = eval_tokens // (batch_size * seq_len)
    assert steps > 0, f"batch of {batch_size}x{seq_len} tokens is larger than EVAL_TOKENS={eval_tokens}"
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad(), autocast(device):
        for _ in range(steps):
            x, y, _ = next(loader)
            loss = model(x, y, reduction="none").view(-1).double()
            nbytes = token_bytes[y.reshape(-1)]
            total_nats += (loss * (nbytes > 0)).sum()
            total_bytes += nbytes.sum()
    return total_nats.item() / (math.log(2) * total_bytes.item())


# ---------------------------------------------------------------------------
# Platform: device, precision, budgets in force, peak FLOPs, memory, attention backend.
# train.py calls these so that it runs on CUDA, Apple MPS or CPU without ever being edited for it.


def get_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slow, MPS support varies)."""
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**2
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1024**2
    return 0.0


# Dense bf16 tensor-core peak, FLOP/s, by a substring of the device name (first match wins).
PEAK_BF16_FLOPS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),  # SXM
    ("H200", 989.5e12),
    ("GH200", 989.5e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 5090", 209.5e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
]


def peak_flops(device):
    """The GPU's dense bf16 peak, or None when the card is not in the table (MFU is then n/a)."""
    import torch

    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(name):
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def _env_int(name, default):
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def eval_settings(device):
    """(sequence length, evaluation tokens) in force on this device."""
    small = device.type != "cuda"
    seq_len = SMALL_SEQ_LEN if small else MAX_SEQ_LEN
    return seq_len, _env_int("AUTORESEARCH_EVAL_TOKENS", SMALL_EVAL_TOKENS if small else EVAL_TOKENS)


def run_settings(device):
    """(seq_len, time_budget, notes): what train.py must use here, and a line for each way in
    which this run differs from the reference setup, for its header. Budgets can be shrunk only
    through AUTORESEARCH_* variables (tests), and a run that does so says it loudly."""
    seq_len, eval_tokens = eval_settings(device)
    time_budget = _env_int("AUTORESEARCH_TIME_BUDGET", TIME_BUDGET)
    notes = []
    if device.type != "cuda":
        notes.append(f"no CUDA: small-machine settings (seq_len {seq_len}, eval {eval_tokens:,} tokens); val_bpb is NOT comparable with GPU runs")
    if time_budget != TIME_BUDGET:
        notes.append(f"NON-DEFAULT TIME_BUDGET={time_budget}s (AUTORESEARCH_TIME_BUDGET)")
    if "AUTORESEARCH_EVAL_TOKENS" in os.environ:
        notes.append(f"NON-DEFAULT EVAL_TOKENS={eval_tokens:,} (AUTORESEARCH_EVAL_TOKENS)")
    if "AUTORESEARCH_CACHE" in os.environ:
        notes.append(f"cache at {CACHE_DIR} (AUTORESEARCH_CACHE)")
    return seq_len, time_budget, notes


# ---- attention: q is (B, T, H, D), k and v (B, T, H_kv, D) with H a multiple of H_kv (grouped-query
# attention when fewer); a window w lets query i see keys j with i - w <= j <= i


def _band_mask(T, window, device):
    import torch

    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j <= window)


def make_attention(backend, device, seq_len):
    """attention(q, k, v, window) for one backend: 'fa4', 'flex' or 'sdpa'. The masks sdpa and flex
    build are kept for later calls, except inside a compiled region: a mask stored there would change
    what the region's guards saw and recompile the whole model at its next call (the mask is built
    in the graph instead, which is cheap)."""
    import torch
    import torch.nn.functional as F

    def cached(cache, key, build):
        value = cache.get(key)
        if value is None:
            value = build()
            if not torch.compiler.is_compiling():
                cache[key] = value
        return value

    if backend == "sdpa":
        masks = {}

        def sdpa(q, k, v, window):
            T = q.size(1)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            gqa = q.size(1) != k.size(1)
            if window >= T - 1:  # the window covers every earlier position: plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                mask = cached(masks, (T, window), lambda: _band_mask(T, window, q.device))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            return y.transpose(1, 2)

        return sdpa

    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_masks = {}

        def block_mask(T, window):
            def band(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

            return cached(block_masks, (T, window), lambda: create_block_mask(band, None, None, T, T, device=str(device)))

        for w in (seq_len, seq_len // 2):  # build the usual masks now, outside any compiled region
            block_mask(seq_len, w)

        def flex(q, k, v, window):
            T = q.size(1)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            y = flex_attention(q, k, v, block_mask=block_mask(T, window), enable_gqa=q.size(1) != k.size(1))
            return y.transpose(1, 2)

        return flex

    if backend == "fa4":
        return _load_fa4(device)
    raise ValueError(f"unknown attention backend {backend!r}")


_FLASH_OPS = {}


def flash_attention_op(name, fwd, bwd):
    """attention(q, k, v, window) from a flash-attention kernel pair, registered as torch.library
    ops (autoresearch::<name>_fwd/_bwd) with shape-only fakes and an autograd rule. torch.compile
    then keeps the kernel as one opaque node of the compiled graph; called directly, a kernel
    whose launcher Dynamo cannot trace breaks the graph and runs slower than FlexAttention.
      fwd(q, k, v, window) -> (out like q, lse (B, H, T) float32)
      bwd(q, k, v, out, dout, lse, window) -> (dq, dk, dv)"""
    import torch
    from torch import Tensor

    if name in _FLASH_OPS:  # an op name is registered once per process
        return _FLASH_OPS[name]

    @torch.library.custom_op(f"autoresearch::{name}_fwd", mutates_args=())
    def op_fwd(q: Tensor, k: Tensor, v: Tensor, window: int) -> tuple[Tensor, Tensor]:
        return tuple(t.contiguous() for t in fwd(q, k, v, window))  # the layout the fake promises

    @op_fwd.register_fake
    def _(q, k, v, window):
        B, T, H, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)

    @torch.library.custom_op(f"autoresearch::{name}_bwd", mutates_args=())
    def op_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(t.contiguous() for t in bwd(q, k, v, out, dout, lse, window))

    @op_bwd.register_fake
    def _(q, k, v, out, dout, lse, window):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, ctx.window = inputs
        ctx.save_for_backward(q, k, v, *output)

    def backward(ctx, dout, dlse):  # lse is an internal by-product: its gradient is never used
        q, k, v, out, lse = ctx.saved_tensors
        return *op_bwd(q, k, v, out, dout, lse, ctx.window), None

    op_fwd.register_autograd(backward, setup_context=setup_context)

    def attention(q, k, v, window):
        return op_fwd(q, k, v, window)[0]

    _FLASH_OPS[name] = attention
    return attention


def _load_fa4(device):
    """flash-attn-4 (PyPI, CuTe DSL kernels for Hopper and Blackwell) as a compile-opaque op. It
    compiles its kernels on first use and keeps them in the cache (compiled GPU code, loaded and
    run by later runs)."""
    import torch

    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        raise RuntimeError("flash-attn-4 needs a Hopper or Blackwell data-centre GPU (sm90/sm100)")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", os.path.join(CACHE_DIR, "flash-attn-4"))
    from flash_attn.cute import interface as fa4

    def left(window, T):  # None = plain causal, its faster kernel
        return None if window >= T - 1 else window

    def fwd(q, k, v, window):
        out, lse, *_ = fa4._flash_attn_fwd(q, k, v, causal=True, window_size_left=left(window, q.size(1)), window_size_right=0, return_lse=True)
        return out, lse

    def bwd(q, k, v, out, dout, lse, window):
        dq, dk, dv = fa4._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True, window_size_left=left(window, q.size(1)), window_size_right=0)
        return dq, dk, dv

    return flash_attention_op("fa4", fwd, bwd)


def relative_error(got, expected):
    """The largest ||g - e|| / ||e|| over pairs of tensors (NaN if any is NaN): how start-up checks
    compare a fast kernel with its reference."""
    errors = [((g.float() - e.float()).norm() / e.float().norm()).item() for g, e in zip(got, expected)]
    return float("nan") if any(math.isnan(e) for e in errors) else max(errors)


def one_line(e):
    """An exception as the one-line reason printed when a fast path is not taken."""
    return str(e).splitlines()[0][:150] if str(e) else type(e).__name__


def ops_called(fn):
    """The names of the operators (aten::..., custom ops) that fn() runs: what a model really calls.
    (The profiler records them without stepping into the dispatch, which FlexAttention's eager path
    would not survive.)"""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.name for event in profile.events()}


def select_attention(device, seq_len, head_dim=128, n_head=2, n_kv_head=2):
    """The fastest attention backend that works here, checked against plain SDPA (output and
    gradients) on a small input with the model's head size and head counts: flash-attn-4
    (Hopper/Blackwell), FlexAttention, then SDPA. Returns (name, function)."""
    import warnings

    import torch

    reference = make_attention("sdpa", device, seq_len)
    candidates = ["fa4", "flex"] if device.type == "cuda" else []
    if os.environ.get("AUTORESEARCH_ATTENTION"):  # force one backend, e.g. to compare them
        candidates = [os.environ["AUTORESEARCH_ATTENTION"]]
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(1, 256, h, head_dim) for h in (n_head, n_kv_head, n_kv_head, n_head)]
    q, k, v, dout = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g) for shape in shapes)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def outputs(fn, window):  # attention output and the gradients of q, k, v
        with warnings.catch_warnings():  # this check runs FlexAttention uncompiled, on purpose
            warnings.simplefilter("ignore")
            out = fn(q, k, v, window)
            return [out, *torch.autograd.grad(out, (q, k, v), dout)]

    for name in candidates:
        if name == "sdpa":
            break
        try:
            fn = make_attention(name, device, seq_len)
            for window in (64, 256):
                err = relative_error(outputs(fn, window), outputs(reference, window))
                if not err < 2e-2:
                    raise RuntimeError(f"output or gradient differs from SDPA (relative error {err:.3g})")
            return name, fn
        except Exception as e:
            print(f"attention: {name} unavailable ({one_line(e)})")
    return "sdpa", reference


# ---------------------------------------------------------------------------
# Command line


def main():
    parser = argparse.ArgumentParser(description="Download climbmix shards and train the tokenizer.")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to fetch (-1 = all)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--source-dir", default=None, help="copy shards from this local folder instead of downloading")
    args = parser.parse_args()
    if args.num_shards == 0 or args.num_shards < -1 or args.download_workers < 1:
        parser.error("--num-shards must be -1 or positive, --download-workers positive")
    if args.source_dir and not os.path.isdir(args.source_dir):
        parser.error(f"--source-dir {args.source_dir} is not a folder")
    t0 = time.time()
    n = MAX_SHARD if args.num_shards == -1 else min(args.num_shards, MAX_SHARD)
    if args.num_shards == -1 and args.source_dir:  # a local folder: every training shard it holds
        # exact names only: "shard_notes.parquet" would crash int(), "shard_00001 (copy).parquet" count twice
        held = [int(f[6:11]) for f in os.listdir(args.source_dir) if f[6:11].isdecimal() and f == shard_name(int(f[6:11]))]
        indices = sorted(i for i in held if i != VAL_SHARD)
    else:
        indices = list(range(n))
    print(f"cache: {CACHE_DIR}")
    failed = fetch_shards(indices + [VAL_SHARD], DATA_DIR, args.download_workers, args.source_dir)
    if failed:
        names = ", ".join(shard_name(i) for i in sorted(failed))
        print(f"prepare: FAILED: {len(failed)} shard(s) missing: {names}. Run it again to resume.", file=sys.stderr)
        sys.exit(1)
    if os.path.exists(os.path.join(TOKENIZER_DIR, "ranks.tiktoken")):
        print(f"tokenizer: already in {TOKENIZER_DIR}")
    else:
        train_tokenizer()
    tokenizer = Tokenizer.from_directory()
    for path in list_shards("val") + list_shards("train")[:PRETOKENIZE_SHARDS]:
        if load_tokenized(path, tokenizer) is None:
            t1 = time.time()
            tokenize_shard(path, tokenizer, num_threads=os.cpu_count() or 1)
            print(f"tokens: {os.path.basename(path)} tokenized in {time.time() - t1:.1f}s")
    print(f"prepare: done in {time.time() - t0:.1f}s: {len(indices)} training shard(s) + validation in {DATA_DIR}, tokenizer in {TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
