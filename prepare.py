"""
autoresearch, the fixed half: data, tokenizer, dataloader, metric and platform plumbing.

    uv run prepare.py                      # 10 training shards + the validation shard, tokenizer
    uv run prepare.py --num-shards 100     # more data (-1 = all 6542 training shards)
    uv run prepare.py --source-dir DIR     # every shard in a local folder instead of downloading
    uv run prepare.py --check              # can train.py run? (downloads and writes nothing)

Everyone's val_bpb is comparable only because everyone downloads the same shards, trains the same
tokenizer, packs the same batches and computes the metric the same way. The agent never edits
this file; train.py imports the runtime utilities at the bottom.
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
DEFAULT_SHARDS = 10  # training shards prepare.py fetches unless told otherwise
PRETOKENIZE_SHARDS = 16  # prepare tokenizes this many training shards ahead (more than a run eats)
# tiktoken's split regex gives up (a panic) only on runs of ~1M characters, such as spaces:
SPLIT_CHECK_CHARS = 100_000  # documents this long are tried before a shard is kept, shorter ones are safe
DOWNLOAD_SECONDS = 900  # per shard, overall: a server that trickles bytes is given up on, not waited for
NAME_LOOKUP_SECONDS = 15  # a host name that does not resolve by then is unreachable

# Without CUDA the figures above would make one experiment take hours: shorter sequences and a
# smaller evaluation. Such a val_bpb is NOT comparable with a GPU's.
SMALL_SEQ_LEN = 512
SMALL_EVAL_TOKENS = 2**16

# What prepare.py and train.py read from the environment; any other AUTORESEARCH_* name is refused
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
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
TOKENS_DIR = os.path.join(CACHE_DIR, "tokens")  # tokenized shards, so later passes skip BPE


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def base_url():
    # HF_ENDPOINT is the standard way to name a Hugging Face mirror (behind a firewall or proxy)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/{DATASET}/resolve/main"


def one_line(e):
    """An exception as one line, for messages."""
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


# ---------------------------------------------------------------------------
# Start of prepare.py and train.py: command line, environment, Ctrl-C

_STOP = threading.Event()  # set by Ctrl-C: downloads under way stop and remove their temporary files


def _env_int(name, default):
    value = os.environ.get(name, str(default))
    if not value.isdecimal() or int(value) == 0:
        raise SystemExit(f"{name}={value!r} must be a positive whole number")
    return int(value)


def _interrupted(signum, frame):
    if _STOP.is_set():  # a second Ctrl-C: at once
        os._exit(130)
    _STOP.set()
    os.write(2, f"\n{os.path.basename(sys.argv[0])}: interrupted\n".encode())
    raise SystemExit(130)  # unwinds, so that temporary files are removed on the way out


def parse_command_line(doc, parser=None):
    """--help (doc, then the environment variables); unknown arguments refused (exit 2); every
    AUTORESEARCH_* variable checked (one line, exit 1); Ctrl-C made one line and exit 130."""
    parser = parser or argparse.ArgumentParser()
    parser.description, parser.formatter_class = doc.strip(), argparse.RawDescriptionHelpFormatter
    parser.epilog = "environment:\n" + "\n".join(f"  {name:<26}{what}" for name, what in ENVIRONMENT.items())
    args = parser.parse_args()
    unknown = sorted(n for n in os.environ if n.startswith("AUTORESEARCH_") and n not in ENVIRONMENT)
    if unknown:
        raise SystemExit(f"{unknown[0]} is not a setting of autoresearch (--help lists them): unset it")
    _env_int("AUTORESEARCH_TIME_BUDGET", TIME_BUDGET)
    _env_int("AUTORESEARCH_EVAL_TOKENS", EVAL_TOKENS)
    if os.environ.get("AUTORESEARCH_CACHE") == "":
        raise SystemExit("AUTORESEARCH_CACHE is empty: unset it (the cache is then ~/.cache/autoresearch) or name a folder")
    if os.environ.get("AUTORESEARCH_ATTENTION", "sdpa") not in ("fa4", "flex", "sdpa"):
        raise SystemExit(f"AUTORESEARCH_ATTENTION={os.environ['AUTORESEARCH_ATTENTION']!r} must be fa4, flex or sdpa")
    signal.signal(signal.SIGINT, _interrupted)
    return args


# ---------------------------------------------------------------------------
# Files: each is written under a temporary name, created exclusively (never through a link planted
# there), checked, then renamed into place. Temporary names of runs that died are removed.


def _temp_path(path):
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def _remove(path):  # a file, a link (never what it points to) or a folder; absent is fine
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _create(path):  # O_EXCL | O_NOFOLLOW refuse whatever is put there after _remove, links included
    _remove(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb")


def _remove_stale_temps(folder):
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        pid = name.rsplit(".", 2)[-2] if name.startswith(".") and name.endswith(".tmp") else ""
        try:
            if pid.isdecimal():
                os.kill(int(pid), 0)  # raises when no process has that pid
        except ProcessLookupError:
            _remove(os.path.join(folder, name))
        except PermissionError:  # another user's run, alive
            pass


# ---------------------------------------------------------------------------
# Shards: download or copy, check every row, then put in place


def shard_is_valid(path):
    """The quick look at a shard in place: its footer (at the end: a truncated file fails) reads."""
    try:
        meta = pq.ParquetFile(path).metadata
        return meta.num_rows > 0 and "text" in meta.schema.names
    except Exception:
        return False


@functools.cache
def _splitter():  # the split pattern with byte tokens and no merges: the part of tokenizing that can fail
    return build_encoding({bytes([i]): i for i in range(256)})


def check_shard(path):
    """None when train.py can use the shard whole: every document a string the tokenizer can take.
    Else what is wrong, naming the row."""
    if not shard_is_valid(path):
        return "not valid parquet with a text column"
    try:
        batches = pq.ParquetFile(path).iter_batches(columns=["text"])
        for row, text in enumerate(t for batch in batches for t in batch.column("text").to_pylist()):
            if not isinstance(text, str):
                return f"row {row} holds {text!r}, not text"
            try:
                if len(text) >= SPLIT_CHECK_CHARS:
                    _splitter().encode_ordinary(text)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # tiktoken's panics are BaseExceptions
                return f"row {row} cannot be tokenized ({one_line(e)})"
    except Exception as e:
        return one_line(e)


class FetchError(Exception):
    """Why a shard could not be had."""


class Retry(FetchError):
    """... where another attempt can help."""


def _download(url, tmp):
    """GET url into tmp within DOWNLOAD_SECONDS. Redirects stay on the host or its subdomains (from
    huggingface.co also its file hosts under hf.co: LFS and Xet storage), never https to http. The
    file must match the sha256 the source publishes (Hugging Face: X-Linked-Etag), else its size."""
    import requests
    import urllib3

    deadline, target, sha, size, got, digest = time.time() + DOWNLOAD_SECONDS, url, None, None, 0, hashlib.sha256()
    home = urllib.parse.urlparse(url)
    hosts = [home.hostname] + (["hf.co"] if home.hostname == "huggingface.co" else [])
    try:
        for _ in range(6):  # at most five redirects
            r = requests.get(target, stream=True, allow_redirects=False, timeout=(10, 30), headers={"Accept-Encoding": "identity"})
            etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").removeprefix("W/").strip('"')
            sha, size = sha or (etag if re.fullmatch("[0-9a-f]{64}", etag) else None), size or r.headers.get("X-Linked-Size")
            if not r.is_redirect:
                break
            r.close()
            target = urllib.parse.urljoin(target, r.headers["Location"])
            to = urllib.parse.urlparse(target)
            if to.scheme not in ("https", home.scheme) or not any(to.hostname == h or (to.hostname or "").endswith("." + h) for h in hosts):
                raise FetchError(f"redirected to {to.hostname}, not a host of {home.hostname}: refused")
        with r:
            if r.status_code != 200:
                raise (Retry if r.status_code >= 500 or r.status_code in (408, 429) else FetchError)(f"HTTP {r.status_code} from {target}")
            size = int(size or r.headers.get("Content-Length") or -1)
            with _create(tmp) as f:
                while chunk := r.raw.read1(1 << 20):  # what has arrived: the deadline holds however slowly bytes trickle
                    if _STOP.is_set() or time.time() > deadline:
                        raise FetchError("interrupted" if _STOP.is_set() else f"not complete after {DOWNLOAD_SECONDS}s ({got:,} bytes): too slow; a mirror (HF_ENDPOINT) or --source-dir may do better")
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        cause = getattr(e.args[0], "reason", None) if e.args else None  # requests wraps urllib3's error
        if isinstance(e, requests.ConnectTimeout) or isinstance(cause, urllib3.exceptions.NewConnectionError):
            why = "no answer in 10 s" if isinstance(e, requests.ConnectTimeout) else one_line(cause.__cause__ or cause)
            raise _unreachable(urllib.parse.urlparse(target).hostname, why)
        raise Retry(one_line(e))
    if size >= 0 and got != size:
        raise Retry(f"truncated: {got:,} of {size:,} bytes")
    if sha and digest.hexdigest() != sha:
        raise Retry(f"sha256 {digest.hexdigest()[:12]}... is not the {sha[:12]}... that the source publishes")


def _unreachable(host, why):
    return SystemExit(f"prepare: cannot reach {host} ({why}). Ways out: copy shards from a local folder (--source-dir DIR), "
                      "download from a mirror (HF_ENDPOINT=URL), or use a cache prepared elsewhere (AUTORESEARCH_CACHE=DIR).")


def _check_name_resolves(host):
    """requests' timeouts do not cover the name lookup, which can hang for minutes: bounded here."""
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
        raise _unreachable(host, one_line(failed[0]) if failed else f"its name did not resolve in {NAME_LOOKUP_SECONDS} s")


def fetch_shard(index, data_dir, source_dir=None, attempts=5, backoff=2.0, log=print):
    """Put shard `index` into data_dir, copied or downloaded (again, after a doubling back-off, where
    that can help), renamed into place once whole and checked. Returns None, or why it could not."""
    name = shard_name(index)
    path, src = os.path.join(data_dir, name), os.path.join(source_dir or "", name)
    tmp = _temp_path(path)
    if shard_is_valid(path):
        return None
    _remove(path)  # a damaged one (a truncated copy) goes first
    if source_dir and not os.path.exists(src):
        return f"not in {source_dir}"
    try:
        for attempt in range(1, attempts + 1):
            try:
                if source_dir is None:
                    _download(f"{base_url()}/{name}", tmp)
                else:
                    with open(src, "rb") as s, _create(tmp) as f:
                        shutil.copyfileobj(s, f, 1 << 20)
                problem = check_shard(tmp)
                if problem:
                    raise FetchError(problem)  # the whole file arrived: another try brings the same
                os.replace(tmp, path)
                return None
            except OSError as e:  # an unreadable source, a full disk, a read-only cache
                return f"cannot {'copy ' + src if source_dir else 'write ' + path}: {e.strerror or e}"
            except FetchError as e:
                _remove(tmp)
                if not isinstance(e, Retry) or attempt == attempts:
                    return f"{e} (after {attempts} attempts)" if isinstance(e, Retry) else str(e)
                wait = backoff * 2 ** (attempt - 1)
                log(f"{name}: attempt {attempt}/{attempts} failed ({e}); retrying in {wait:g}s")
                if _STOP.wait(wait):
                    return "interrupted"
    finally:
        _remove(tmp)


def fetch_shards(indices, data_dir, workers=8, source_dir=None, backoff=2.0):
    """Fetch shards in parallel. Returns {index: reason} for the ones that could not be had."""
    os.makedirs(data_dir, exist_ok=True)
    _remove_stale_temps(data_dir)
    _STOP.clear()
    todo = [i for i in indices if not shard_is_valid(os.path.join(data_dir, shard_name(i)))]
    print(f"data: {len(indices) - len(todo)}/{len(indices)} shards already in {data_dir}; fetching {len(todo)} from {source_dir or base_url()}")
    failed, t0 = {}, time.time()
    if todo and not source_dir:
        _check_name_resolves(urllib.parse.urlparse(base_url()).hostname)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        futures = {i: pool.submit(fetch_shard, i, data_dir, source_dir, 5, backoff) for i in todo}
        try:
            for done, (i, future) in enumerate(futures.items(), 1):
                reason = failed[i] = future.result()
                print(f"  {shard_name(i)}: " + (f"FAILED: {reason}" if reason else f"ok ({done}/{len(todo)}, {time.time() - t0:.0f}s)"), flush=True)
        except BaseException:  # Ctrl-C, an unreachable host: downloads under way stop, queued ones never start
            _STOP.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return {i: reason for i, reason in failed.items() if reason}


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
        pf, row = pq.ParquetFile(path), -1
        for rg in range(pf.num_row_groups):
            for row, text in enumerate(pf.read_row_group(rg, columns=["text"]).column("text").to_pylist(), row + 1):
                if not isinstance(text, str):  # a shard an older version kept without checking its rows
                    raise SystemExit(f"{path} row {row} holds {text!r}, not text: delete it and run `uv run prepare.py` to fetch it again.")
                doc = text[:doc_cap]
                total += len(doc)
                yield doc
                if total >= max_chars:
                    return


def build_encoding(mergeable_ranks, pattern=SPLIT_PATTERN):
    import tiktoken

    specials = {tok: len(mergeable_ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="autoresearch", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=specials)


def token_byte_lengths(encoding):
    """UTF-8 length of each token's raw bytes; 0 for special tokens. (Decoding a token to str and
    re-encoding over-counts tokens that hold part of a multi-byte character.)"""
    special = set(encoding._special_tokens.values())
    return np.array([0 if i in special else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)], dtype=np.int32)


def train_tokenizer(data_dir=None, tokenizer_dir=None):
    """Train the BPE tokenizer on the training shards and save it atomically."""
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
        raise SystemExit(f"tokenizer: got {encoding.n_vocab} tokens, expected {VOCAB_SIZE}: too little training text?")
    sample = "Hello world! Ünïcödé → 東京 🚀 naïve café, 12345 tabs\tand\nnewlines."
    if encoding.decode(encoding.encode_ordinary(sample)) != sample:
        raise SystemExit("tokenizer: round trip failed on non-ASCII text")
    save_tokenizer(ranks, trainer.get_pattern(), tokenizer_dir)
    print(f"tokenizer: {encoding.n_vocab} tokens, trained in {time.time() - t0:.1f}s, saved to {tokenizer_dir}")


def save_tokenizer(ranks, pattern, tokenizer_dir):
    """ranks.tiktoken (tiktoken's base64 text format), meta.json and token_bytes.npy, written into a
    temporary folder, checked as train.py will read them, then renamed into place."""
    tmp = _temp_path(os.path.abspath(tokenizer_dir))
    _remove(tmp)
    os.makedirs(tmp)
    try:
        lines = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
        meta = {"pattern": pattern, "special_tokens": SPECIAL_TOKENS, "vocab_size": len(ranks) + len(SPECIAL_TOKENS)}
        for name, data in [("ranks.tiktoken", lines.encode()), ("meta.json", json.dumps(meta, indent=1).encode())]:
            with _create(os.path.join(tmp, name)) as f:
                f.write(data)
        with _create(os.path.join(tmp, "token_bytes.npy")) as f:
            np.save(f, token_byte_lengths(build_encoding(ranks, pattern)))
        read_tokenizer(tmp)
        _remove(tokenizer_dir)
        os.replace(tmp, tokenizer_dir)
    finally:
        _remove(tmp)


def read_tokenizer(tokenizer_dir=None):
    """(encoding, token_bytes, fingerprint) of the saved tokenizer, its files checked against each
    other and the constants above; else one line naming the file and the repair. The fingerprint
    names its token cache and covers all that decides token ids: ranks, pattern, special tokens."""
    tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
    if not os.path.exists(os.path.join(tokenizer_dir, "ranks.tiktoken")):
        raise SystemExit(f"No tokenizer in {tokenizer_dir}: run `uv run prepare.py` first.")
    damaged = f"The tokenizer in {tokenizer_dir} is damaged ({{}}): run `uv run prepare.py` to train it again."
    name = "ranks.tiktoken"  # the file being read, for the message
    try:
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            raw = f.read()
        ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in (line.split() for line in raw.splitlines())}
        name = "meta.json"
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            raw_meta = f.read()
        meta, name = json.loads(raw_meta), "token_bytes.npy"
        token_bytes = np.load(os.path.join(tokenizer_dir, name), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SystemExit(damaged.format(f"{name}: {one_line(e)}")) from None
    n = VOCAB_SIZE - len(SPECIAL_TOKENS)
    if sorted(ranks.values()) != list(range(n)) or not all(bytes([b]) in ranks for b in range(256)):
        raise SystemExit(damaged.format(f"ranks.tiktoken does not hold ranks 0..{n - 1} once each, every single byte among them"))
    if meta != {"pattern": SPLIT_PATTERN, "special_tokens": SPECIAL_TOKENS, "vocab_size": VOCAB_SIZE}:
        raise SystemExit(damaged.format("meta.json's pattern, special tokens or vocabulary size are not prepare.py's"))
    encoding = build_encoding(ranks, meta["pattern"])
    if token_bytes.dtype != np.int32 or not np.array_equal(token_bytes, token_byte_lengths(encoding)):
        raise SystemExit(damaged.format("token_bytes.npy does not match ranks.tiktoken"))
    return encoding, token_bytes, hashlib.sha256(raw + raw_meta).hexdigest()[:16]


class Tokenizer:
    """A tiktoken.Encoding over the trained ranks, with BOS and batch encoding."""

    def __init__(self, encoding, fingerprint=""):
        self.enc = encoding
        self.bos_token_id = encoding.encode_single_token(BOS_TOKEN)
        self.fingerprint = fingerprint  # names the token cache of this tokenizer

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        """The saved tokenizer, its files checked: missing or damaged is one line naming the repair."""
        encoding, _, fingerprint = read_tokenizer(tokenizer_dir)
        return cls(encoding, fingerprint)

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

    return torch.from_numpy(read_tokenizer(tokenizer_dir)[1]).to(device)


# ---------------------------------------------------------------------------
# Tokenized shards: documents of one parquet file as one uint16 array (BOS in front of each), with
# document offsets and the number of documents per row group. Cached per tokenizer, so that epochs
# after the first, and evaluations, skip BPE entirely. Same tokens either way.


def _tokens_path(path, tokenizer):
    return os.path.join(TOKENS_DIR, tokenizer.fingerprint, os.path.basename(path).replace(".parquet", ".npz"))


def load_tokenized(path, tokenizer):
    """A shard's cached (tokens, offsets, rg_docs); None when absent, stale (the shard changed) or
    not consistent with itself and the vocabulary (it is then made again)."""
    cache = _tokens_path(path, tokenizer)
    try:
        with np.load(cache, allow_pickle=False) as z:
            tokens, offsets, rg_docs, stamp = (z[k] for k in ("tokens", "offsets", "rg_docs", "stamp"))
        st = os.stat(path)
        if (stamp.tolist() == [st.st_size, st.st_mtime_ns] and tokens.dtype == np.uint16 and offsets.dtype == rg_docs.dtype == np.int64
                and tokens.ndim == offsets.ndim == rg_docs.ndim == 1 and len(offsets) == rg_docs.sum() + 1 and rg_docs.min(initial=0) >= 0
                and offsets[0] == 0 and offsets[-1] == len(tokens) and (np.diff(offsets) > 0).all()
                and tokens.max(initial=0) < tokenizer.get_vocab_size() and (tokens[offsets[:-1]] == tokenizer.bos_token_id).all()):
            return tokens, offsets, rg_docs
    except FileNotFoundError:
        return None
    except Exception:
        pass
    print(f"tokens: {cache} is stale or damaged: tokenizing {os.path.basename(path)} again", flush=True)
    return None


def tokenize_shard(path, tokenizer, num_threads=None):
    """Tokenize a shard whole and store it in the token cache, written whole and then renamed;
    returns (tokens, offsets, rg_docs). A failed write (a full disk) is an error, not a slow path."""
    docs, rg_docs = [], []
    try:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            docs += (np.array(d, dtype=np.uint16) for d in tokenizer.encode(texts, tokenizer.bos_token_id, num_threads or os.cpu_count() or 1))
            rg_docs.append(len(texts))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a shard cached before every row was checked (tiktoken's panics are BaseExceptions)
        raise SystemExit(f"{path} cannot be tokenized ({check_shard(path) or one_line(e)}): delete it and run `uv run prepare.py` to fetch it again.")
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs)), out=offsets[1:])
    tokens, rg_docs = np.concatenate([np.zeros(0, np.uint16), *docs]), np.array(rg_docs, np.int64)
    cache, st = _tokens_path(path, tokenizer), os.stat(path)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with _create(_temp_path(cache)) as f:
            np.savez(f, tokens=tokens, offsets=offsets, rg_docs=rg_docs, stamp=np.array([st.st_size, st.st_mtime_ns], np.int64))
        os.replace(_temp_path(cache), cache)
    except OSError as e:
        raise SystemExit(f"Cannot write the token cache ({e}): free some space (or delete {TOKENS_DIR}) and run again.")
    finally:
        _remove(_temp_path(cache))
    return tokens, offsets, rg_docs


def document_batches(tokenizer, paths):
    """Forever: (list of token arrays, epoch) per batch of up to DOCS_PER_READ documents, file by
    file, row group by row group; a batch never spans two row groups. epoch counts passes from 1."""
    epoch = 1
    while True:
        documents = 0
        for path in paths:
            tokens, offsets, rg_docs = load_tokenized(path, tokenizer) or tokenize_shard(path, tokenizer)
            start = 0
            for n in rg_docs.tolist():
                for lo in range(start, start + n, DOCS_PER_READ):
                    yield [tokens[offsets[j] : offsets[j + 1]] for j in range(lo, min(lo + DOCS_PER_READ, start + n))], epoch
                start += n
            documents += start
        if not documents:
            raise SystemExit(f"No documents in {', '.join(paths)}: run `uv run prepare.py` again.")
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
        t = (t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)).long()  # pinned: the copy overlaps the GPU's work
        yield t[:, :-1], t[:, 1:], epoch


# ---------------------------------------------------------------------------
# Metric: bits per byte on the validation shard, independent of the vocabulary size


def evaluate_bpb(model, tokenizer, batch_size, progress_after=10.0):
    """val_bpb = sum of per-token losses (nats) over targets that stand for bytes, divided by
    ln 2 times the number of those bytes. Fixed data, fixed token count: deterministic. Once it has
    taken progress_after seconds (a small machine, a first compile), it prints where it is."""
    import torch

    device = next(model.parameters()).device
    seq_len, eval_tokens = eval_settings(device)
    token_bytes = get_token_bytes(device)
    loader = make_dataloader(tokenizer, batch_size, seq_len, "val")
    steps = eval_tokens // (batch_size * seq_len)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    t0, shown = time.time(), 0
    with torch.no_grad(), autocast(device):
        for step in range(1, steps + 1):
            x, y, _ = next(loader)
            loss = model(x, y, reduction="none").view(-1).double()
            nbytes = token_bytes[y.reshape(-1)]
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


def check_ready(tokenizer, batch_size, device):
    """What evaluation will need, checked before training so that a problem costs seconds, not a
    whole run: one evaluation batch within the evaluation tokens, the training shards' footers, and
    the validation shard's tokens (made now when not cached). from_directory checked the tokenizer."""
    seq_len, eval_tokens = eval_settings(device)
    if eval_tokens < batch_size * seq_len:
        raise SystemExit(f"EVAL_TOKENS={eval_tokens:,} is less than one evaluation batch of {batch_size} x {seq_len} tokens: "
                         "raise AUTORESEARCH_EVAL_TOKENS or lower DEVICE_BATCH_SIZE")
    val = check_data(PRETOKENIZE_SHARDS)[-1]  # the training shards a run reaches; the validation shard
    _remove_stale_temps(os.path.join(TOKENS_DIR, tokenizer.fingerprint))
    load_tokenized(val, tokenizer) or tokenize_shard(val, tokenizer)


def check_data(train_shards=None):
    """The shards train.py will read (the first train_shards training ones, then the validation one), footers whole."""
    paths = list_shards("train")[:train_shards] + list_shards("val")
    damaged = [os.path.basename(p) for p in paths if not shard_is_valid(p)]
    if damaged:
        raise SystemExit(f"Damaged shard(s) in {DATA_DIR}: {', '.join(damaged)}: run `uv run prepare.py` to fetch them again.")
    return paths


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
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


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


# Dense bf16 tensor-core peak, FLOP/s, by a substring of the device name (first match wins; plain H100 is the SXM).
PEAK_BF16_FLOPS = [
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989.5e12), ("H200", 989.5e12), ("GH200", 989.5e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 5090", 209.5e12), ("RTX 4090", 165.2e12), ("RTX 3090", 71e12),
]


def peak_flops(device):
    """The GPU's dense bf16 peak, or None when the card is not in the table (MFU is then n/a)."""
    import torch

    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(name):
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def eval_settings(device):
    """(sequence length, evaluation tokens) in force on this device."""
    small = device.type != "cuda"
    seq_len = SMALL_SEQ_LEN if small else MAX_SEQ_LEN
    return seq_len, _env_int("AUTORESEARCH_EVAL_TOKENS", SMALL_EVAL_TOKENS if small else EVAL_TOKENS)


def run_settings(device):
    """(seq_len, time_budget, notes): what train.py must use here, and a header line for each way in
    which the result is not comparable (the AUTORESEARCH_* budgets of tests say so loudly)."""
    seq_len, eval_tokens = eval_settings(device)
    time_budget = _env_int("AUTORESEARCH_TIME_BUDGET", TIME_BUDGET)
    notes = []
    if device.type != "cuda":
        notes.append(f"no CUDA: small-machine settings (seq_len {seq_len}, eval {eval_tokens:,} tokens); val_bpb is NOT comparable with GPU runs")
    if time_budget != TIME_BUDGET:
        notes.append(f"NON-DEFAULT TIME_BUDGET={time_budget}s (AUTORESEARCH_TIME_BUDGET)")
    if "AUTORESEARCH_EVAL_TOKENS" in os.environ:
        notes.append(f"NON-DEFAULT EVAL_TOKENS={eval_tokens:,} (AUTORESEARCH_EVAL_TOKENS)")
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


def ops_called(fn):
    """The names of the operators (aten::..., custom ops) that fn() runs: what a model really calls.
    (The profiler records them without stepping into the dispatch, which FlexAttention's eager path
    would not survive.)"""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as profile:  # (no warning)
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-shards", type=int, metavar="N", help=f"training shards 0..N-1 to fetch (default {DEFAULT_SHARDS}, or every one in --source-dir; -1 = all)")
    parser.add_argument("--download-workers", type=int, default=8, metavar="W", help="parallel downloads (default 8)")
    parser.add_argument("--source-dir", metavar="DIR", help="copy shards from this local folder instead of downloading")
    parser.add_argument("--check", action="store_true", help="only say whether train.py can run (downloads and writes nothing)")
    args = parse_command_line(__doc__, parser)
    if args.num_shards is not None and (args.num_shards == 0 or args.num_shards < -1) or args.download_workers < 1:
        parser.error("--num-shards must be -1 or positive, --download-workers positive")
    if args.source_dir and not os.path.isdir(args.source_dir):
        parser.error(f"--source-dir {args.source_dir} is not a folder")
    print(f"cache: {CACHE_DIR}")
    if args.check:
        sys.exit(check_cache())
    t0 = time.time()
    if args.source_dir and args.num_shards in (None, -1):  # every training shard the folder holds
        # exact names only: "shard_notes.parquet" would crash int(), "shard_00001 (copy).parquet" count twice
        held = [int(f[6:11]) for f in os.listdir(args.source_dir) if f[6:11].isdecimal() and f == shard_name(int(f[6:11]))]
        indices = sorted(i for i in held if i != VAL_SHARD)
        if not indices:
            parser.error(f"--source-dir {args.source_dir} holds no training shard ({shard_name(0)}, ...)")
    else:
        n = args.num_shards or DEFAULT_SHARDS
        indices = list(range(MAX_SHARD if n == -1 else min(n, MAX_SHARD)))
    try:
        os.makedirs(CACHE_DIR, exist_ok=True)
        lock = os.open(os.path.join(CACHE_DIR, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:  # one prepare.py at a time on a cache (agents may share one): the next one waits, then finds the work done
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"prepare: another prepare.py is working on {CACHE_DIR}; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        tokens = [os.path.join(TOKENS_DIR, d) for d in os.listdir(TOKENS_DIR)] if os.path.isdir(TOKENS_DIR) else []
        for folder in [CACHE_DIR, TOKENS_DIR, *tokens]:
            _remove_stale_temps(folder)
        failed = fetch_shards([VAL_SHARD] + indices, DATA_DIR, args.download_workers, args.source_dir)
        if failed:
            again = " Run it again to resume." if any(r.endswith(" attempts)") for r in failed.values()) else ""
            sys.exit(f"prepare: FAILED: {len(failed)} shard(s) missing: {', '.join(shard_name(i) for i in sorted(failed))}.{again}")
        try:
            tokenizer = Tokenizer.from_directory()
            print(f"tokenizer: already in {TOKENIZER_DIR}")
        except SystemExit as e:  # absent, or damaged: trained (again)
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
    print(f"prepare: done in {time.time() - t0:.1f}s: {len(indices)} training shard(s) + validation in {DATA_DIR}, tokenizer in {TOKENIZER_DIR}")


def check_cache():
    """prepare.py --check: can train.py run on this cache? Downloads and writes nothing; returns the exit status."""
    try:
        paths = check_data()
        problem = check_shard(paths[-1])  # the validation shard, read whole
        if problem:
            raise SystemExit(f"{paths[-1]}: {problem}: delete it and run `uv run prepare.py` to fetch it again.")
        print(f"data: {len(paths) - 1} training shard(s) + validation in {DATA_DIR}")
        read_tokenizer()
        print(f"tokenizer: {TOKENIZER_DIR}")
    except SystemExit as e:
        print(f"NOT READY: {e}")
        return 1
    print("ready: `uv run train.py` can run")
    return 0


if __name__ == "__main__":
    main()
