"""autoresearch, the fixed half: data, tokenizer, dataloader and metric, then the plumbing any model needs.

    uv run prepare.py                      # 10 training shards + the validation shard, tokenizer
    uv run prepare.py --num-shards 100     # more data (-1 = all 6542 training shards)
    uv run prepare.py --source-dir DIR     # every shard in a local folder instead of downloading
    uv run prepare.py --check              # can train.py run? (downloads and writes nothing)

Everyone's val_bpb is comparable only because everyone downloads the same shards, trains the same
tokenizer, packs the same batches and computes the metric the same way. The agent never edits this file.
"""

import argparse
import base64
import bisect
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.parse
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
# without CUDA the figures above would make one experiment take hours: shorter rows, a smaller evaluation
SMALL_SEQ_LEN, SMALL_EVAL_TOKENS = 512, 2**16  # such a val_bpb is NOT comparable with a GPU's

DATASET = "karpathy/climbmix-400b-shuffle"
MAX_SHARD = 6542  # shards are shard_00000 ... shard_06542
VAL_SHARD = MAX_SHARD  # the last one: always downloaded, never trained on
DEFAULT_SHARDS = 10  # training shards prepare.py fetches unless told otherwise
PRETOKENIZE_SHARDS = 16  # prepare tokenizes this many training shards ahead (more than a run eats)
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4's split pattern with numbers in groups of at most two
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
TOKENIZER_MAX_CHARS = 1_000_000_000  # characters of training text the tokenizer sees
TOKENIZER_DOC_CAP = 10_000  # each document is cut to its first 10,000 characters
DOCS_PER_READ = 128  # a row group is read in batches of this many documents
SPLIT_CHECK_CHARS = 100_000  # documents this long are split once before a shard is kept (tiktoken panics at ~1M)

# Downloads: a server that does not answer, or trickles, is given up on within minutes
DOWNLOAD_ATTEMPTS = 3  # per shard, where another attempt can help
BACKOFF_SECONDS = 2.0  # the wait before the second attempt, doubled before each next one
CONNECT_SECONDS = 10  # no connection by then: the host is unreachable
READ_SECONDS = 10  # a read with no byte by then fails the attempt (Hugging Face's own client waits as long)
PROGRESS_WINDOW_SECONDS = 30  # each window this long must bring PROGRESS_FLOOR_BYTES, else the attempt ends
PROGRESS_FLOOR_BYTES = 2**19  # 512 KiB in 30 s: about 1 MB a minute
NAME_LOOKUP_SECONDS = 15  # a host name that does not resolve by then is unreachable
STALE_TEMP_SECONDS = 6 * 3600  # another host's temporary file untouched this long is dead (its pid means nothing here)

# dense bf16 tensor-core FLOP/s by a part of the device name; longer names first ("H100" alone is the SXM)
PEAK_BF16_FLOPS = [("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989.5e12), ("H200", 989.5e12),
                   ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 5090", 209.5e12),
                   ("RTX 4090", 165.2e12), ("RTX 3090", 71e12)]

# what prepare.py and train.py read from the environment; any other AUTORESEARCH_* name is refused
ENVIRONMENT = {
    "AUTORESEARCH_CACHE": "the cache folder (default ~/.cache/autoresearch)",
    "AUTORESEARCH_TIME_BUDGET": "seconds of timed training, for tests (the result is not comparable)",
    "AUTORESEARCH_EVAL_TOKENS": "validation tokens, for tests (the result is not comparable)",
    "AUTORESEARCH_ATTENTION": "fa4, flex or sdpa: force one attention backend (train.py)",
    "AUTORESEARCH_SAMPLE_DATA": "the real-text sample shards (the test suite)",
    "HF_ENDPOINT": "a Hugging Face mirror to download from (prepare.py)",
}
# a relative AUTORESEARCH_CACHE is taken from the current folder; an empty one is refused at start
CACHE_DIR = os.path.abspath(os.path.expanduser(os.environ.get("AUTORESEARCH_CACHE") or "~/.cache/autoresearch"))
DATA_DIR, TOKENIZER_DIR, TOKENS_DIR = (os.path.join(CACHE_DIR, name) for name in ("data", "tokenizer", "tokens"))

class NotReady(Exception):
    """What a script needs is missing, damaged or cannot be had; the message is one line saying what to
    do. The scripts print it and exit 1 (parse_command_line sees to it)."""

def first_line(e):  # an exception as one line, for messages
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__

# ---------------------------------------------------------------------------
# Data: parquet shards of documents (one `text` column), in DATA_DIR

def shard_name(index):
    return f"shard_{index:05d}.parquet"

def list_shards(split, data_dir=None):
    """Parquet files of a split, sorted by name. 'train' is every shard but the validation one."""
    data_dir = data_dir or DATA_DIR
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet")) if os.path.isdir(data_dir) else []
    names = [n for n in names if (n == shard_name(VAL_SHARD)) == (split == "val")]
    if not names:
        what = "validation" if split == "val" else "training"
        raise NotReady(f"No {what} shard in {data_dir}: run `uv run prepare.py` first.")
    return [os.path.join(data_dir, n) for n in names]

def read_documents(path):  # a shard's documents in order, one list per row group
    shard = pq.ParquetFile(path)
    for group in range(shard.num_row_groups):
        yield shard.read_row_group(group, columns=["text"]).column("text").to_pylist()

def damaged_shard(path, problem):  # the error for a shard whose footer reads but whose rows train.py cannot use
    return NotReady(f"{path}: {problem}: delete it and run `uv run prepare.py` to fetch it again.")

# ---------------------------------------------------------------------------
# Tokenizer: BPE trained with rustbpe, run by tiktoken; saved as plain text, JSON and a .npy read
# without pickle (nothing that can run code on load)

def build_encoding(ranks, pattern=SPLIT_PATTERN):
    import tiktoken
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="autoresearch", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)

@functools.cache
def split_only_encoding():
    """The split pattern over the 256 single bytes, no merges: the part of tokenizing that can fail."""
    return build_encoding({bytes([i]): i for i in range(256)})

def shard_problem(path, every_row=False):
    """None when the shard is fine, else what is wrong. The quick look reads the footer, at the end of the
    file (a truncated one has none); every_row also reads each document and splits the long ones."""
    meta = None
    with contextlib.suppress(Exception):
        meta = pq.ParquetFile(path).metadata
    if meta is None or meta.num_rows == 0 or "text" not in meta.schema.names:
        return "not valid parquet with a text column"
    try:
        for row, text in enumerate(t for texts in (read_documents(path) if every_row else []) for t in texts):
            if not isinstance(text, str):
                return f"row {row} holds {text!r}, not text"
            try:
                if len(text) >= SPLIT_CHECK_CHARS:
                    split_only_encoding().encode_ordinary(text)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # tiktoken's panics are BaseExceptions
                return f"row {row} cannot be tokenized ({first_line(e)})"
    except Exception as e:
        return first_line(e)
    return None

def tokenizer_training_text(paths, max_chars=TOKENIZER_MAX_CHARS, doc_cap=TOKENIZER_DOC_CAP):
    """Documents in the pinned order: files sorted by name, row groups in order, rows in order;
    each cut to doc_cap characters; stop right after the one that reaches max_chars in total."""
    total = 0
    for path in paths:
        for text in (t for texts in read_documents(path) for t in texts):
            if not isinstance(text, str):  # a shard put into the cache by hand, its rows never checked
                raise damaged_shard(path, shard_problem(path, every_row=True))
            doc = text[:doc_cap]
            total += len(doc)
            yield doc
            if total >= max_chars:
                return

def token_byte_lengths(encoding):
    """UTF-8 length of each token's raw bytes; 0 for special tokens. (Decoding a token to str and
    re-encoding over-counts tokens that hold part of a multi-byte character.)"""
    special = set(encoding._special_tokens.values())
    lengths = [0 if i in special else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    return np.array(lengths, dtype=np.int32)

def train_tokenizer(data_dir=None, tokenizer_dir=None):  # train the BPE tokenizer on the training shards and save it
    import rustbpe
    data_dir, tokenizer_dir = data_dir or DATA_DIR, tokenizer_dir or TOKENIZER_DIR
    list_shards("val", data_dir)  # both splits must exist, else a clear refusal
    train_paths = list_shards("train", data_dir)
    t0 = time.time()
    print(f"tokenizer: training on {len(train_paths)} shard(s), up to {TOKENIZER_MAX_CHARS:,} characters")
    def text():  # with progress: reading is most of the time
        chars = 0
        for doc in tokenizer_training_text(train_paths):
            yield doc
            chars += len(doc)
            if chars // 10**8 > (chars - len(doc)) // 10**8:
                print(f"tokenizer: {chars:,} characters read ({time.time() - t0:.0f}s)", flush=True)
        print(f"tokenizer: {chars:,} characters read ({time.time() - t0:.0f}s); computing the merges", flush=True)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(text(), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
    encoding = build_encoding(ranks, trainer.get_pattern())
    if encoding.n_vocab != VOCAB_SIZE:
        raise NotReady(f"tokenizer: got {encoding.n_vocab} tokens, expected {VOCAB_SIZE}: too little training text?")
    sample = "Hello world! Ünïcödé → 東京 🚀 naïve café, 12345 tabs\tand\nnewlines."
    if encoding.decode(encoding.encode_ordinary(sample)) != sample:
        raise NotReady("tokenizer: round trip failed on non-ASCII text")
    save_tokenizer(ranks, trainer.get_pattern(), tokenizer_dir)
    print(f"tokenizer: {encoding.n_vocab} tokens, trained in {time.time() - t0:.1f}s, saved to {tokenizer_dir}")

def save_tokenizer(ranks, pattern, tokenizer_dir):
    """ranks.tiktoken (tiktoken's base64 text format), meta.json and token_bytes.npy in a new folder, read
    back as train.py reads them before it replaces the old one."""
    lines = "".join(f"{base64.b64encode(tok).decode()} {ranks[tok]}\n" for tok in sorted(ranks, key=ranks.get))
    meta = {"pattern": pattern, "special_tokens": SPECIAL_TOKENS, "vocab_size": len(ranks) + len(SPECIAL_TOKENS)}
    with atomic_write(tokenizer_dir) as tmp:
        os.mkdir(tmp)
        for name, data in [("ranks.tiktoken", lines.encode()), ("meta.json", json.dumps(meta, indent=1).encode())]:
            with new_file(os.path.join(tmp, name)) as f:
                f.write(data)
        with new_file(os.path.join(tmp, "token_bytes.npy")) as f:
            np.save(f, token_byte_lengths(build_encoding(ranks, pattern)))
        read_tokenizer(tmp)

def read_tokenizer(tokenizer_dir=None):
    """(encoding, token_bytes, fingerprint) of the saved tokenizer, its files checked against each
    other and the constants above; else one line naming the file and the repair. The fingerprint
    names its token cache and covers all that decides token ids: ranks, pattern, special tokens."""
    tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
    if not os.path.exists(os.path.join(tokenizer_dir, "ranks.tiktoken")):
        raise NotReady(f"No tokenizer in {tokenizer_dir}: run `uv run prepare.py` first.")
    damaged = f"The tokenizer in {tokenizer_dir} is damaged ({{}}): run `uv run prepare.py` to train it again."
    name = "ranks.tiktoken"  # the file being read, for the message
    try:
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            raw = f.read()
        ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in map(bytes.split, raw.splitlines())}
        name = "meta.json"
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            raw_meta = f.read()
        meta, name = json.loads(raw_meta), "token_bytes.npy"
        token_bytes = np.load(os.path.join(tokenizer_dir, name), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise NotReady(damaged.format(f"{name}: {first_line(e)}")) from None
    n = VOCAB_SIZE - len(SPECIAL_TOKENS)
    if sorted(ranks.values()) != list(range(n)) or not all(bytes([b]) in ranks for b in range(256)):
        raise NotReady(damaged.format(f"ranks.tiktoken does not hold ranks 0..{n - 1} once each, all bytes among them"))
    if meta != {"pattern": SPLIT_PATTERN, "special_tokens": SPECIAL_TOKENS, "vocab_size": VOCAB_SIZE}:
        raise NotReady(damaged.format("meta.json's pattern, special tokens or vocabulary size are not prepare.py's"))
    encoding = build_encoding(ranks, meta["pattern"])
    if token_bytes.dtype != np.int32 or not np.array_equal(token_bytes, token_byte_lengths(encoding)):
        raise NotReady(damaged.format("token_bytes.npy does not match ranks.tiktoken"))
    return encoding, token_bytes, hashlib.sha256(raw + raw_meta).hexdigest()[:16]

class Tokenizer:
    """A tiktoken.Encoding over the trained ranks, with BOS and batch encoding."""
    def __init__(self, encoding, fingerprint=""):
        self.enc = encoding
        self.bos_token_id = encoding.encode_single_token(BOS_TOKEN)
        self.fingerprint = fingerprint  # names the token cache of this tokenizer
    @classmethod
    def from_directory(cls, tokenizer_dir=None):  # missing or damaged is one line naming the repair
        encoding, _, fingerprint = read_tokenizer(tokenizer_dir)
        return cls(encoding, fingerprint)
    def get_vocab_size(self):
        return self.enc.n_vocab
    def get_bos_token_id(self):
        return self.bos_token_id
    def encode(self, text, prepend=None, num_threads=8):
        """A string, or a list of strings as a batch (multi-threaded); `prepend` (a token id or a special
        token's text) goes in front of every document."""
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
    return torch.from_numpy(read_tokenizer(tokenizer_dir)[1]).to(device)

# ---------------------------------------------------------------------------
# Token cache: a shard tokenized once (one uint16 array, BOS in front of each document; document offsets; documents
# per row group) in TOKENS_DIR/<fingerprint>, so that later epochs and evaluations skip BPE for the same tokens

def token_cache_path(path, tokenizer):
    return os.path.join(TOKENS_DIR, tokenizer.fingerprint, os.path.basename(path).replace(".parquet", ".npz"))

def load_tokenized(path, tokenizer):
    """A shard's cached (tokens, offsets, docs_per_row_group); None when absent, stale (the shard changed)
    or not consistent with itself and the vocabulary (it is then made again)."""
    cache = token_cache_path(path, tokenizer)
    try:
        with np.load(cache, allow_pickle=False) as z:
            tokens, offsets, per_group, stat = (z[k] for k in ("tokens", "offsets", "docs_per_row_group", "shard_stat"))
        st = os.stat(path)
        if (stat.tolist() == [st.st_size, st.st_mtime_ns] and tokens.dtype == np.uint16
                and offsets.dtype == per_group.dtype == np.int64 and tokens.ndim == offsets.ndim == per_group.ndim == 1
                and len(offsets) == per_group.sum() + 1 and per_group.min(initial=0) >= 0
                and offsets[0] == 0 and offsets[-1] == len(tokens) and (np.diff(offsets) > 0).all()
                and tokens.max(initial=0) < tokenizer.get_vocab_size()
                and (tokens[offsets[:-1]] == tokenizer.bos_token_id).all()):
            return tokens, offsets, per_group
    except FileNotFoundError:
        return None
    except Exception:
        pass
    print(f"tokens: {cache} is stale or damaged: tokenizing {os.path.basename(path)} again", flush=True)
    return None

def tokenize_shard(path, tokenizer, num_threads=None):
    """(tokens, offsets, docs_per_row_group) of a shard, stored in the token cache. A failed write (a full
    disk) is an error, not a slow path."""
    docs, per_group = [], []
    try:
        for texts in read_documents(path):
            ids = tokenizer.encode(texts, tokenizer.bos_token_id, num_threads or os.cpu_count() or 1)
            docs += (np.array(d, dtype=np.uint16) for d in ids)
            per_group.append(len(texts))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a shard put into the cache by hand (tiktoken's panics are BaseExceptions)
        raise damaged_shard(path, f"cannot be tokenized ({shard_problem(path, every_row=True) or first_line(e)})")
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs)), out=offsets[1:])
    tokens, per_group = np.concatenate([np.zeros(0, np.uint16), *docs]), np.array(per_group, np.int64)
    cache, st = token_cache_path(path, tokenizer), os.stat(path)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with atomic_write(cache) as tmp, new_file(tmp) as f:
            np.savez(f, tokens=tokens, offsets=offsets, docs_per_row_group=per_group,
                     shard_stat=np.array([st.st_size, st.st_mtime_ns], np.int64))
    except OSError as e:
        raise NotReady(f"Cannot write the token cache ({e}): free some space (or delete {TOKENS_DIR}) and run again.")
    return tokens, offsets, per_group

def document_batches(tokenizer, paths):
    """Forever: (list of token arrays, epoch) per batch of up to DOCS_PER_READ documents, file by
    file, row group by row group; a batch never spans two row groups. epoch counts passes from 1."""
    epoch = 1
    while True:
        documents = 0
        for path in paths:
            tokens, offsets, per_group = load_tokenized(path, tokenizer) or tokenize_shard(path, tokenizer)
            start = 0
            for n in per_group.tolist():
                for lo in range(start, start + n, DOCS_PER_READ):
                    batch = range(lo, min(lo + DOCS_PER_READ, start + n))
                    yield [tokens[offsets[j] : offsets[j + 1]] for j in batch], epoch
                start += n
            documents += start
        if not documents:
            raise NotReady(f"No documents in {', '.join(paths)}: run `uv run prepare.py` again.")
        epoch += 1

# ---------------------------------------------------------------------------
# Dataloader: best-fit packing of BOS-aligned documents into rows, no padding

def pack_rows(tokenizer, T, split, buffer_size=1000, data_dir=None):
    """Forever: (row of T+1 tokens as int32 numpy, epoch). Before every placement the buffer is
    refilled to buffer_size documents. With r tokens of room: place the longest document that fits
    whole, else the first r tokens of the shortest (earliest among equals either way). Per-length
    queues (arrival order) and a sorted list of lengths make each placement a bisect, not a scan."""
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
    """Forever: (inputs, targets, epoch), inputs and targets B x T int64 on the training device; the
    rows come in the same order whatever B. epoch is that of the most recent document batch read."""
    import torch
    assert split in ("train", "val"), split
    device = get_device()
    rows = pack_rows(tokenizer, T, split, buffer_size, data_dir)
    while True:
        batch = np.empty((B, T + 1), dtype=np.int32)
        for b in range(B):
            batch[b], epoch = next(rows)
        t = torch.from_numpy(batch)  # pinned on CUDA: the copy overlaps the GPU's work
        t = (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=device.type == "cuda").long()
        yield t[:, :-1], t[:, 1:], epoch

# ---------------------------------------------------------------------------
# Metric: bits per byte on the validation shard, independent of the vocabulary size

def eval_settings(device):  # (sequence length, evaluation tokens) in force on this device: at least one row of tokens
    seq_len, default = (MAX_SEQ_LEN, EVAL_TOKENS) if device.type == "cuda" else (SMALL_SEQ_LEN, SMALL_EVAL_TOKENS)
    eval_tokens = env_positive_int("AUTORESEARCH_EVAL_TOKENS", default)
    if eval_tokens < seq_len:
        raise NotReady(f"AUTORESEARCH_EVAL_TOKENS={eval_tokens} is less than one row of {seq_len} tokens: raise it")
    return seq_len, eval_tokens

def evaluate_bpb(model, tokenizer, batch_size, progress_after=10.0):
    """val_bpb = sum of per-token losses (nats) over targets that stand for bytes, divided by ln 2 times
    the number of those bytes, over the first eval_tokens // seq_len rows of the validation loader: the
    same rows whatever batch_size. The last batch is filled up with the rows that follow, their losses
    left out, so that a compiled model sees one shape only. Past progress_after seconds it says where it is."""
    import torch
    device = next(model.parameters()).device
    seq_len, eval_tokens = eval_settings(device)
    rows = eval_tokens // seq_len
    steps = -(-rows // batch_size)
    token_bytes = get_token_bytes(device)
    loader = make_dataloader(tokenizer, batch_size, seq_len, "val")
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    t0, shown = time.time(), 0
    with torch.no_grad(), autocast(device):
        for step in range(1, steps + 1):
            x, y, _ = next(loader)
            used = min(batch_size, rows - (step - 1) * batch_size)  # the batch's rows that are evaluated
            loss = model(x, y, reduction="none").view(batch_size, -1)[:used].double()
            nbytes = token_bytes[y[:used]]
            total_nats += (loss * (nbytes > 0)).sum()
            total_bytes += nbytes.sum()
            if time.time() - t0 > progress_after and (step == steps or 10 * step // steps > shown):
                shown = 10 * step // steps
                print(f"evaluation: {step}/{steps} batches ({time.time() - t0:.0f}s)", flush=True)
    bpb = total_nats.item() / (math.log(2) * total_bytes.item())
    if not math.isfinite(bpb):  # NaN or inf losses: the run has no result
        print(f"FAIL: val_bpb is {bpb}", flush=True)
        sys.exit(1)
    return bpb

def check_shards(train_shards=None):
    """The shards train.py reads (the first train_shards training ones, then the validation one),
    their footers whole; else one line naming the damaged ones. Returns their paths."""
    paths = list_shards("train")[:train_shards] + list_shards("val")
    damaged = ", ".join(os.path.basename(p) for p in paths if shard_problem(p))
    if damaged:
        raise NotReady(f"Damaged shard(s) in {DATA_DIR}: {damaged}: run `uv run prepare.py` to fetch them again.")
    return paths

def check_ready(tokenizer, device):
    """What a run reads, checked before training so that a problem costs seconds, not a whole run: the
    evaluation size (any batch size can evaluate), the shards' footers, the validation tokens (made now)."""
    eval_settings(device)
    val = check_shards(PRETOKENIZE_SHARDS)[-1]
    remove_stale_temps(os.path.join(TOKENS_DIR, tokenizer.fingerprint))
    load_tokenized(val, tokenizer) or tokenize_shard(val, tokenizer)

# ---------------------------------------------------------------------------
# PLUMBING any model needs. A reader of the metric may stop here: what follows is files, downloads,
# the scripts' start, device, precision, memory, peak FLOPs, attention backends and main.

# ---- Files: each is written under a temporary name, checked, then renamed into place. Temporary names hold the
# host, the pid and a random part: runs on hosts sharing the cache never pick the same, and leftovers show whose.

THIS_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"
RUN_TOKEN = os.urandom(4).hex()  # two hosts can have one name and one pid, but not this as well
TEMP_NAME = re.compile(r"\..+~(?P<host>[^~]+)~(?P<pid>[0-9]+)~[0-9a-f]+\.tmp")

def temp_path(path):
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}~{THIS_HOST}~{os.getpid()}~{RUN_TOKEN}.tmp")

def remove(path):  # a file, a link (never what it points to) or a folder; absent is fine
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

def new_file(path):  # O_EXCL | O_NOFOLLOW: refuses whatever is already there, a link included
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb")

@contextlib.contextmanager
def atomic_write(path):
    """with atomic_write(path) as tmp: write tmp (a file through new_file, or a folder) and check it; if the
    block ends without an exception, tmp is renamed onto path, so readers never see a part of it."""
    tmp = temp_path(path)
    remove(tmp)  # anything put there (a planted link) goes, never written through
    try:
        yield tmp
        if os.path.isdir(tmp):  # a folder cannot be renamed over another: the old one goes first
            remove(path)
        os.replace(tmp, path)
    finally:
        remove(tmp)

def process_exists(pid):
    try:
        os.kill(pid, 0)  # sends nothing: only asks
        return True
    except PermissionError:  # another user's
        return True
    except ProcessLookupError:
        return False

def remove_stale_temps(folder):
    """Removes what dead runs left in folder under temp_path's names: this host's once their process is
    gone, any host's once untouched for STALE_TEMP_SECONDS (another host's pid means nothing here)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match, path = TEMP_NAME.fullmatch(name), os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
            if match and (time.time() - os.lstat(path).st_mtime > STALE_TEMP_SECONDS
                          or (match["host"] == THIS_HOST and not process_exists(int(match["pid"])))):
                remove(path)

def lock_cache():
    """One prepare.py at a time on the cache, till it ends: the next one waits, then finds the work done.
    On NFS flock may hold only among a host's processes, so runs on other hosts may work beside this
    one: slower, but safe (temporary names, renames and remove_stale_temps above see to it)."""
    lock = os.open(os.path.join(CACHE_DIR, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"prepare: another prepare.py is working on {CACHE_DIR}; waiting for it", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:  # no lock service (some NFS mounts): safe without the lock, if slower
        print(f"prepare: cannot lock {CACHE_DIR} ({e.strerror}): working without the lock", flush=True)

# ---- Downloads: shards fetched or copied, checked row by row, then renamed into place

_STOP = threading.Event()  # set by Ctrl-C: downloads under way stop and remove their temporary files

class FetchError(Exception):
    """Why a shard could not be had."""

class TransientFetchError(FetchError):
    """... where another attempt can help."""

class TooSlow(TransientFetchError):
    """... a download that brought less than PROGRESS_FLOOR_BYTES in a window, or nothing in READ_SECONDS."""

def base_url():  # HF_ENDPOINT is the standard way to name a Hugging Face mirror (behind a firewall or proxy)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/{DATASET}/resolve/main"

def download(url, tmp):
    """GET url into tmp. Redirects stay on the host or its subdomains (from huggingface.co also hf.co,
    its LFS and Xet storage), never https to http. The file must match the sha256 the source publishes
    (Hugging Face: X-Linked-Etag), else its size."""
    import requests
    import urllib3
    target, sha, size, got, digest = url, None, None, 0, hashlib.sha256()
    home = to = urllib.parse.urlparse(url)
    hosts = [home.hostname] + (["hf.co"] if home.hostname == "huggingface.co" else [])
    try:
        for _ in range(6):  # at most five redirects
            r = requests.get(target, stream=True, allow_redirects=False, timeout=(CONNECT_SECONDS, READ_SECONDS),
                             headers={"Accept-Encoding": "identity"})
            etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").removeprefix("W/").strip('"')
            sha, size = sha or re.fullmatch("[0-9a-f]{64}", etag) and etag, size or r.headers.get("X-Linked-Size")
            if not r.is_redirect:
                break
            r.close()
            target = urllib.parse.urljoin(target, r.headers["Location"])
            to = urllib.parse.urlparse(target)
            on_home = any(to.hostname == h or (to.hostname or "").endswith("." + h) for h in hosts)
            if to.scheme not in ("https", home.scheme) or not on_home:
                raise FetchError(f"redirected to {to.hostname}, not a host of {home.hostname}: refused")
        with r:
            if r.status_code != 200:
                transient = r.status_code >= 500 or r.status_code in (408, 429)
                raise (TransientFetchError if transient else FetchError)(f"HTTP {r.status_code} from {target}")
            size = int(size or r.headers.get("Content-Length") or -1)
            window_start, window_bytes = time.monotonic(), 0
            with new_file(tmp) as f:
                while chunk := r.raw.read1(1 << 20):  # what has arrived, however little
                    if _STOP.is_set():
                        raise FetchError("interrupted")
                    f.write(chunk)
                    digest.update(chunk)
                    got, window_bytes = got + len(chunk), window_bytes + len(chunk)
                    if time.monotonic() - window_start >= PROGRESS_WINDOW_SECONDS:
                        if window_bytes < PROGRESS_FLOOR_BYTES:
                            raise TooSlow(f"{to.hostname} sent less than {PROGRESS_FLOOR_BYTES:,} bytes in "
                                          f"{PROGRESS_WINDOW_SECONDS:g} s")
                        window_start, window_bytes = time.monotonic(), 0
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        cause = getattr(e.args[0], "reason", None) if e.args else None  # requests wraps urllib3's error
        timed_out = isinstance(e, requests.ConnectTimeout)
        if timed_out or isinstance(cause, urllib3.exceptions.NewConnectionError):
            why = f"no answer in {CONNECT_SECONDS} s" if timed_out else first_line(cause.__cause__ or cause)
            raise cannot_download(f"cannot reach {urllib.parse.urlparse(target).hostname} ({why})")
        if isinstance(e, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
            raise TooSlow(f"{to.hostname} sent nothing for {READ_SECONDS:g} s")
        raise TransientFetchError(first_line(e))
    if size >= 0 and got != size:
        raise TransientFetchError(f"truncated: {got:,} of {size:,} bytes")
    if sha and digest.hexdigest() != sha:
        raise TransientFetchError(f"sha256 {digest.hexdigest()[:12]}... is not the {sha[:12]}... the source publishes")

def cannot_download(why):
    return NotReady(f"prepare: {why}. Ways out: copy shards from a local folder (--source-dir DIR), download "
                    "from a mirror (HF_ENDPOINT=URL), or use a cache prepared elsewhere (AUTORESEARCH_CACHE=DIR).")

def check_name_resolves(host):  # bounded: requests' timeouts do not cover the lookup, which can hang for minutes
    failed = []
    def lookup():
        try:
            socket.getaddrinfo(host, None)
        except OSError as e:
            failed.append(e)
    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(NAME_LOOKUP_SECONDS)
    if thread.is_alive() or failed:
        why = first_line(failed[0]) if failed else f"its name did not resolve in {NAME_LOOKUP_SECONDS} s"
        raise cannot_download(f"cannot reach {host} ({why})")

def fetch_shard(index, data_dir, source_dir=None, attempts=DOWNLOAD_ATTEMPTS, backoff=None, log=print):
    """Put shard `index` into data_dir, copied or downloaded (again, after a doubling back-off, where
    that can help), whole and checked before it takes its name. Returns None, or why it could not.
    A download too slow in every attempt ends the run (NotReady): the other shards would be too."""
    name = shard_name(index)
    path, src = os.path.join(data_dir, name), os.path.join(source_dir or "", name)
    if shard_problem(path) is None:
        return None
    remove(path)  # a damaged one (a truncated copy) goes first
    if source_dir and not os.path.exists(src):
        return f"not in {source_dir}"
    for attempt in range(1, attempts + 1):
        try:
            with atomic_write(path) as tmp:
                if source_dir is None:
                    download(f"{base_url()}/{name}", tmp)
                else:
                    with open(src, "rb") as s, new_file(tmp) as f:
                        shutil.copyfileobj(s, f, 1 << 20)
                problem = shard_problem(tmp, every_row=True)
                if problem:
                    raise FetchError(problem)  # the whole file arrived: another try brings the same
            return None
        except OSError as e:  # an unreadable source, a full disk, a read-only cache
            return f"cannot {'copy ' + src if source_dir else 'write ' + path}: {e.strerror or e}"
        except FetchError as e:
            if not isinstance(e, TransientFetchError):
                return str(e)
            if attempt == attempts and isinstance(e, TooSlow):  # the other shards would be too slow as well
                raise cannot_download(f"downloads are too slow ({e}; {attempts} attempts): try again later") from None
            if attempt == attempts:
                return f"{e} (after {attempts} attempts)"
            wait = (backoff or BACKOFF_SECONDS) * 2 ** (attempt - 1)
            log(f"{name}: attempt {attempt}/{attempts} failed ({e}); retrying in {wait:g}s")
            if _STOP.wait(wait):
                return "interrupted"

def fetch_shards(indices, data_dir, workers=8, source_dir=None, backoff=None):
    """Fetches shards in parallel; returns {index: reason} for those that could not be had."""
    os.makedirs(data_dir, exist_ok=True)
    remove_stale_temps(data_dir)
    _STOP.clear()
    todo = [i for i in indices if shard_problem(os.path.join(data_dir, shard_name(i)))]
    print(f"data: {len(indices) - len(todo)}/{len(indices)} shards already in {data_dir}; "
          f"fetching {len(todo)} from {source_dir or base_url()}")
    failed, t0 = {}, time.time()
    if todo and not source_dir:
        check_name_resolves(urllib.parse.urlparse(base_url()).hostname)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        futures = {i: pool.submit(fetch_shard, i, data_dir, source_dir, backoff=backoff) for i in todo}
        try:
            for done, (i, future) in enumerate(futures.items(), 1):
                reason = failed[i] = future.result()
                outcome = f"FAILED: {reason}" if reason else f"ok ({done}/{len(todo)}, {time.time() - t0:.0f}s)"
                print(f"  {shard_name(i)}: {outcome}", flush=True)
        except BaseException:  # Ctrl-C, the host unreachable or too slow: downloads stop, queued ones are dropped
            _STOP.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return {i: reason for i, reason in failed.items() if reason}

# ---- Start of prepare.py and train.py: command line, environment variables, Ctrl-C

def env_positive_int(name, default):
    value = os.environ.get(name, str(default))
    if not value.isdecimal() or int(value) == 0:
        raise NotReady(f"{name}={value!r} must be a positive whole number")
    return int(value)

def _on_ctrl_c(signum, frame):
    if _STOP.is_set():  # a second Ctrl-C: at once
        os._exit(130)
    _STOP.set()
    os.write(2, f"\n{os.path.basename(sys.argv[0])}: interrupted\n".encode())
    raise SystemExit(130)  # unwinds, so that temporary files are removed on the way out

def print_not_ready(kind, error, traceback):  # the scripts' sys.excepthook: an uncaught NotReady is one line
    if issubclass(kind, NotReady):
        print(error, file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)

def parse_command_line(doc, parser=None):
    """--help (doc, then the environment variables); unknown arguments refused (exit 2); AUTORESEARCH_*
    checked; Ctrl-C one line and exit 130; from here on an uncaught NotReady its one line and exit 1."""
    sys.excepthook = print_not_ready
    parser = parser or argparse.ArgumentParser()
    parser.description, parser.formatter_class = doc.strip(), argparse.RawDescriptionHelpFormatter
    parser.epilog = "environment:\n" + "\n".join(f"  {name:<26}{what}" for name, what in ENVIRONMENT.items())
    args = parser.parse_args()
    unknown = sorted(n for n in os.environ if n.startswith("AUTORESEARCH_") and n not in ENVIRONMENT)
    if unknown:
        raise NotReady(f"{unknown[0]} is not a setting of autoresearch (--help lists them): unset it")
    env_positive_int("AUTORESEARCH_TIME_BUDGET", TIME_BUDGET)
    env_positive_int("AUTORESEARCH_EVAL_TOKENS", EVAL_TOKENS)
    if os.environ.get("AUTORESEARCH_CACHE") == "":
        raise NotReady("AUTORESEARCH_CACHE is empty: name a folder, or unset it for ~/.cache/autoresearch")
    if os.environ.get("AUTORESEARCH_ATTENTION", "sdpa") not in ("fa4", "flex", "sdpa"):
        raise NotReady(f"AUTORESEARCH_ATTENTION={os.environ['AUTORESEARCH_ATTENTION']!r} must be fa4, flex or sdpa")
    signal.signal(signal.SIGINT, _on_ctrl_c)
    return args

# ---- Device, precision, memory, peak FLOPs and the settings in force: train.py calls these so that
# it runs on CUDA, Apple MPS or CPU without ever being edited for it

def get_device():
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

def autocast(device):  # bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slow, MPS support varies)
    import torch
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

def synchronize(device):  # waits for the work queued on a GPU (CUDA or MPS)
    import torch
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()

def peak_memory_mb(device):
    """MiB: the GPU's peak allocations; on the CPU the peak resident memory (results.tsv's 0.0 is a crash)."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**2
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1024**2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes; bytes on macOS
    return peak / (1024**2 if sys.platform == "darwin" else 1024)

def peak_flops(device):  # the GPU's dense bf16 peak, or None when the card is not in the table (MFU is then n/a)
    import torch
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

def peak_flops_of(name):
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)

def run_settings(device):
    """(seq_len, time_budget, notes): what train.py must use here, and a header line for each way in
    which the result is not comparable (the AUTORESEARCH_* budgets of tests say so loudly)."""
    seq_len, eval_tokens = eval_settings(device)
    time_budget = env_positive_int("AUTORESEARCH_TIME_BUDGET", TIME_BUDGET)
    notes = []
    if device.type != "cuda":
        notes.append(f"no CUDA: small-machine settings (seq_len {seq_len}, eval {eval_tokens:,} tokens); "
                     "val_bpb is NOT comparable with GPU runs")
    if time_budget != TIME_BUDGET:
        notes.append(f"NON-DEFAULT TIME_BUDGET={time_budget}s (AUTORESEARCH_TIME_BUDGET)")
    if "AUTORESEARCH_EVAL_TOKENS" in os.environ:
        notes.append(f"NON-DEFAULT EVAL_TOKENS={eval_tokens:,} (AUTORESEARCH_EVAL_TOKENS)")
    return seq_len, time_budget, notes

# ---- Attention: q is (B, T, H, D), k and v (B, T, H_kv, D) with H a multiple of H_kv (grouped-query
# attention when fewer); a window w lets query i see keys j with i - w <= j <= i

def make_attention(backend, device, seq_len):
    """attention(q, k, v, window) for one backend: 'sdpa', 'flex' or 'fa4'. sdpa and flex keep the mask of
    each (length, window) for later calls, except while torch.compile traces the model: storing it then
    would make the compiled model depend on the dict and compile again at its next call. (Built inside
    the compiled model, a mask is cheap.)"""
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
        def band(T, window, device):
            i = torch.arange(T, device=device)[:, None]  # query positions; the keys' are its transpose
            return (i.T <= i) & (i - i.T <= window)
        def sdpa(q, k, v, window):
            T = q.size(1)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            gqa = q.size(1) != k.size(1)
            if window >= T - 1:  # the window covers every earlier position: plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                mask = cached(masks, (T, window), lambda: band(T, window, q.device))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            return y.transpose(1, 2)
        return sdpa
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        masks = {}
        def block_mask(T, window):
            def band(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
            return cached(masks, (T, window), lambda: create_block_mask(band, None, None, T, T, device=str(device)))
        for w in (seq_len, seq_len // 2):  # build the usual masks now, outside any compiled region
            block_mask(seq_len, w)
        def flex(q, k, v, window):
            T = q.size(1)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            y = flex_attention(q, k, v, block_mask=block_mask(T, window), enable_gqa=q.size(1) != k.size(1))
            return y.transpose(1, 2)
        return flex
    return _load_fa4(device)

_FLASH_OPS = {}  # the ops registered so far, by name: a name is registered once per process
def flash_attention_op(name, fwd, bwd):
    """attention(q, k, v, window) from flash-attention kernels fwd(q, k, v, window) -> (out shaped like q,
    lse: each query's log-sum-exp of scores, (B, H, T) float32) and bwd(q, k, v, out, dout, lse, window)
    -> (dq, dk, dv). Each is registered as a custom op (autoresearch::<name>_fwd, _bwd) with an autograd
    rule and a stand-in that only makes outputs of the right shapes, so that torch.compile keeps each
    kernel as one step of the compiled model without looking inside: a kernel called plainly, whose
    launcher the compiler cannot follow, would cut the model in pieces and run slower than FlexAttention."""
    import torch
    from torch import Tensor
    if name in _FLASH_OPS:
        return _FLASH_OPS[name]
    @torch.library.custom_op(f"autoresearch::{name}_fwd", mutates_args=())
    def op_fwd(q: Tensor, k: Tensor, v: Tensor, window: int) -> tuple[Tensor, Tensor]:
        return tuple(t.contiguous() for t in fwd(q, k, v, window))  # the layout the stand-in promises
    @op_fwd.register_fake
    def _(q, k, v, window):
        B, T, H, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)
    @torch.library.custom_op(f"autoresearch::{name}_bwd", mutates_args=())
    def op_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
               window: int) -> tuple[Tensor, Tensor, Tensor]:
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
    _FLASH_OPS[name] = lambda q, k, v, window: op_fwd(q, k, v, window)[0]
    return _FLASH_OPS[name]

def _load_fa4(device):
    """flash-attn-4 (PyPI, CuTe DSL kernels for Hopper and Blackwell) as a compile-opaque op. It compiles
    its kernels on first use into the cache folder, where later runs load them."""
    import torch
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        raise RuntimeError("flash-attn-4 needs a Hopper or Blackwell data-centre GPU (sm90/sm100)")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", os.path.join(CACHE_DIR, "flash-attn-4"))
    from flash_attn.cute import interface as fa4
    def keys_left(window, T):  # fa4's window_size_left; None is plain causal, its faster kernel
        return None if window >= T - 1 else window
    def fwd(q, k, v, window):
        out, lse, *_ = fa4._flash_attn_fwd(q, k, v, causal=True, window_size_left=keys_left(window, q.size(1)),
                                           window_size_right=0, return_lse=True)
        return out, lse
    def bwd(q, k, v, out, dout, lse, window):
        return fa4._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True,
                                   window_size_left=keys_left(window, q.size(1)), window_size_right=0)
    return flash_attention_op("fa4", fwd, bwd)

def relative_error(got, expected):
    """The largest ||g - e|| / ||e|| over pairs of tensors (NaN if any is NaN): a fast kernel against its reference."""
    errors = [((g.float() - e.float()).norm() / e.float().norm()).item() for g, e in zip(got, expected)]
    return float("nan") if any(math.isnan(e) for e in errors) else max(errors)

def ops_called(fn):
    """The operators (aten::..., custom ops) that fn() runs, recorded without stepping into the dispatch
    (which FlexAttention's eager path would not survive): what a model really calls."""
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as profile:
        fn()
    return {event.name for event in profile.events()}

def select_attention(device, seq_len, head_dim=128, n_head=2, n_kv_head=2):
    """(name, function) of the fastest attention backend that works here: flash-attn-4, FlexAttention, then
    SDPA, each checked against SDPA (output and gradients) with the model's head size and head counts."""
    import warnings
    import torch
    reference = make_attention("sdpa", device, seq_len)
    forced = os.environ.get("AUTORESEARCH_ATTENTION")  # one backend, e.g. to compare them
    candidates = [forced] if forced else ["fa4", "flex"] if device.type == "cuda" else []
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(1, 256, h, head_dim) for h in (n_head, n_kv_head, n_kv_head, n_head)]
    q, k, v, dout = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g) for shape in shapes)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    def outputs(fn, window):  # attention output and the gradients of q, k, v
        with warnings.catch_warnings():  # this check runs FlexAttention uncompiled, on purpose
            warnings.simplefilter("ignore")
            out = fn(q, k, v, window)
            return [out, *torch.autograd.grad(out, (q, k, v), dout)]
    for name in (c for c in candidates if c != "sdpa"):
        try:
            fn = make_attention(name, device, seq_len)
            for window in (64, 256):
                err = relative_error(outputs(fn, window), outputs(reference, window))
                if not err < 2e-2:
                    raise RuntimeError(f"output or gradient differs from SDPA (relative error {err:.3g})")
            return name, fn
        except Exception as e:
            print(f"attention: {name} unavailable ({first_line(e)})")
    return "sdpa", reference

# ---- prepare.py itself: fetch the shards, train the tokenizer, tokenize ahead; or --check

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-shards", type=int, metavar="N", help="training shards 0..N-1 to fetch (default "
                        f"{DEFAULT_SHARDS}, or every one in --source-dir; -1 = all)")
    parser.add_argument("--download-workers", type=int, default=8, metavar="W", help="parallel downloads (default 8)")
    parser.add_argument("--source-dir", metavar="DIR", help="copy shards from this local folder instead of downloading")
    parser.add_argument("--check", action="store_true", help="only say whether train.py can run (writes nothing)")
    args = parse_command_line(__doc__, parser)
    if args.num_shards is not None and (args.num_shards == 0 or args.num_shards < -1) or args.download_workers < 1:
        parser.error("--num-shards must be -1 or positive, --download-workers positive")
    if args.source_dir and not os.path.isdir(args.source_dir):
        parser.error(f"--source-dir {args.source_dir} is not a folder")
    print(f"cache: {CACHE_DIR}")
    if args.check:  # can train.py run on this cache? Reads what it needs; downloads and writes nothing
        try:
            paths = check_shards()
            problem = shard_problem(paths[-1], every_row=True)  # the validation shard, read whole
            if problem:
                raise damaged_shard(paths[-1], problem)
            print(f"data: {len(paths) - 1} training shard(s) + validation in {DATA_DIR}")
            read_tokenizer()
            print(f"tokenizer: {TOKENIZER_DIR}\nready: `uv run train.py` can run")
        except NotReady as e:
            print(f"NOT READY: {e}")
            sys.exit(1)
        return
    t0 = time.time()
    if args.source_dir and args.num_shards in (None, -1):  # every training shard the folder holds
        held = [int(f[6:11]) for f in os.listdir(args.source_dir) if re.fullmatch(r"shard_[0-9]{5}\.parquet", f)]
        indices = sorted(i for i in held if i != VAL_SHARD)
        if not indices:
            parser.error(f"--source-dir {args.source_dir} holds no training shard ({shard_name(0)}, ...)")
    else:
        n = args.num_shards or DEFAULT_SHARDS
        indices = list(range(MAX_SHARD if n == -1 else min(n, MAX_SHARD)))
    try:
        os.makedirs(CACHE_DIR, exist_ok=True)
        lock_cache()
        tokens = [os.path.join(TOKENS_DIR, d) for d in os.listdir(TOKENS_DIR)] if os.path.isdir(TOKENS_DIR) else []
        for folder in [CACHE_DIR, TOKENS_DIR, *tokens]:
            remove_stale_temps(folder)
        failed = fetch_shards([VAL_SHARD] + indices, DATA_DIR, args.download_workers, args.source_dir)
        if failed:
            again = " Run it again to resume." if any(r.endswith(" attempts)") for r in failed.values()) else ""
            missing = ", ".join(map(shard_name, sorted(failed)))
            sys.exit(f"prepare: FAILED: {len(failed)} shard(s) missing: {missing}.{again}")
        try:
            tokenizer = Tokenizer.from_directory()
            print(f"tokenizer: already in {TOKENIZER_DIR}")
        except NotReady as e:  # absent, or damaged: trained (again)
            if os.path.exists(TOKENIZER_DIR):
                print(f"tokenizer: {e}")
            train_tokenizer()
            tokenizer = Tokenizer.from_directory()
        for path in list_shards("val") + list_shards("train")[:PRETOKENIZE_SHARDS]:
            if load_tokenized(path, tokenizer) is None:
                t1 = time.time()
                tokenize_shard(path, tokenizer)
                print(f"tokens: {os.path.basename(path)} tokenized in {time.time() - t1:.1f}s")
    except OSError as e:  # a full disk, a cache that cannot be written
        sys.exit(f"prepare: FAILED: {e}")
    print(f"prepare: done in {time.time() - t0:.1f}s: {len(indices)} training shard(s) + validation in {DATA_DIR}, "
          f"tokenizer in {TOKENIZER_DIR}")

if __name__ == "__main__":
    main()
