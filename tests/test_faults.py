"""Faults outside the network, with real processes and real files: damaged tokenizers and token
caches, a truncated validation shard, bad AUTORESEARCH_* values, links planted in the cache, a full
disk (a file-size limit), Ctrl-C, concurrent runs on one cache, --help and --check, and a newcomer's
first commands. Downloads are tests/test_download.py's."""

import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import prepare
from conftest import ROOT, make_shards, sample_data_dir, train_copy, write_shard

PROJECT_FILES = ["prepare.py", "train.py", "program.md", ".gitignore", "pyproject.toml", "uv.lock", "README.md",
                 "analysis.ipynb"]


def copy_cache(tiny_cache, dest, parts=("data", "tokenizer")):
    for part in parts:
        shutil.copytree(tiny_cache / part, dest / part)
    return dest


def env_with(cache, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_EVAL_TOKENS="8192", CUDA_VISIBLE_DEVICES="",
               PYTHONUNBUFFERED="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9: no download
    return dict(env, **extra)


def run(script, cache, *args, timeout=120, limit_bytes=None, **extra):
    """A real prepare.py or train.py process; limit_bytes caps the size of any file it writes (a full disk)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))  # writes past it fail with EFBIG

    return subprocess.run([sys.executable, script, *args], env=env_with(cache, **extra), cwd=os.path.dirname(script),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=cap if limit_bytes else None)


PREPARE = os.path.join(ROOT, "prepare.py")


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def temps(folder):
    return [os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files if n.endswith(".tmp")]


# ---------------------------------------------------------------------------
# The tokenizer and the token cache


def delete_a_ranks_line(folder):
    lines = (folder / "ranks.tiktoken").read_text().splitlines(keepends=True)
    (folder / "ranks.tiktoken").write_text("".join(lines[:300] + lines[301:]))


def change_the_pattern(folder):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(dict(meta, pattern=meta["pattern"].replace("{1,2}", "{1,3}"))))


DAMAGES = {
    "a ranks line deleted": (delete_a_ranks_line, "ranks.tiktoken"),
    "the split pattern changed": (change_the_pattern, "meta.json"),
    "token_bytes.npy short": (lambda f: np.save(f / "token_bytes.npy", np.load(f / "token_bytes.npy")[:-1]),
                              "token_bytes.npy"),
    "token_bytes.npy of objects": (lambda f: np.save(f / "token_bytes.npy", np.arange(8192).astype(object)),
                                   "token_bytes.npy"),
    "token_bytes.npy missing": (lambda f: os.remove(f / "token_bytes.npy"), "token_bytes.npy"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_tokenizer_is_one_line_naming_the_file_and_the_repair(tiny_cache, tmp_path, damage):
    spoil, name = DAMAGES[damage]
    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_cache / "tokenizer", folder)
    spoil(folder)
    for load in (prepare.Tokenizer.from_directory, lambda folder: prepare.get_token_bytes("cpu", folder)):
        with pytest.raises(prepare.NotReady) as e:
            load(str(folder))
        message = str(e.value)
        assert "\n" not in message and name in message, message
        assert message.endswith("run `uv run prepare.py` to train it again."), message


def test_prepare_repairs_a_damaged_tokenizer(tiny_cache, tmp_path):
    """The command the message names really repairs it: prepare.py trains the tokenizer again."""
    cache = copy_cache(tiny_cache, tmp_path)
    delete_a_ranks_line(cache / "tokenizer")
    r = run(PREPARE, cache, "--num-shards", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is damaged (ranks.tiktoken does not hold ranks 0..8187" in r.stdout
    assert "tokenizer: training on 3 shard(s)" in r.stdout
    ranks = "tokenizer/ranks.tiktoken"
    assert (cache / ranks).read_bytes() == (tiny_cache / ranks).read_bytes()
    assert run(PREPARE, cache, "--check").returncode == 0


@pytest.mark.parametrize("spoil", [
    lambda z: dict(z, tokens=np.where(np.arange(len(z["tokens"])) == 5, 9000, z["tokens"]).astype(np.uint16)),  # > 8191
    lambda z: dict(z, offsets=z["offsets"][:-1]),  # documents and offsets disagree
    lambda z: dict(z, tokens=z["tokens"].astype(np.int64)),  # another dtype
    None,  # not a zip file at all
], ids=["out-of-vocabulary id", "offsets cut", "int64 tokens", "garbage"])
def test_a_damaged_token_cache_file_is_made_again(use_cache, capsys, spoil):
    tok = prepare.Tokenizer.from_directory()
    val = prepare.list_shards("val")[0]
    shutil.rmtree(prepare.TOKENS_DIR, ignore_errors=True)
    expected = prepare.tokenize_shard(val, tok)
    cache = prepare.token_cache_path(val, tok)
    if spoil is None:
        open(cache, "wb").write(b"not a zip file")
    else:
        with np.load(cache) as z:
            arrays = dict(z)
        np.savez(cache, **spoil(arrays))
    capsys.readouterr()
    assert prepare.load_tokenized(val, tok) is None
    assert capsys.readouterr().out == f"tokens: {cache} is stale or damaged: tokenizing {os.path.basename(val)} again\n"
    batches = prepare.document_batches(tok, [val])
    first = next(batches)[0]
    assert all(np.array_equal(a, expected[0][expected[1][i]:expected[1][i + 1]]) for i, a in enumerate(first))
    assert all(np.array_equal(a, b) for a, b in zip(prepare.load_tokenized(val, tok), expected))  # made again, whole


def test_a_shard_put_into_the_cache_by_hand_is_named_with_its_row(use_cache, tmp_path):
    """prepare.py checks every row of a shard it fetches; one copied into the cache by hand may hold a row
    that cannot be tokenized: one line naming the shard, the row and the repair, and no token cache."""
    path = str(tmp_path / "shard_00000.parquet")
    write_shard(path, ["fine", "fine too", None, "fine"], row_group_size=2)
    with pytest.raises(prepare.NotReady) as e:
        prepare.tokenize_shard(path, prepare.Tokenizer.from_directory())
    assert str(e.value) == (f"{path}: cannot be tokenized (row 2 holds None, not text): delete it and run "
                            "`uv run prepare.py` to fetch it again.")
    assert not os.path.exists(prepare.token_cache_path(path, prepare.Tokenizer.from_directory()))


def test_train_checks_what_evaluation_needs_before_training(tiny_cache, tmp_path):
    """With a 300 s budget, each problem stops train.py within seconds, in one line naming the
    repair, instead of after the whole budget."""
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    train = train_copy(tmp_path)
    t0 = time.time()
    r = run(train, cache, AUTORESEARCH_TIME_BUDGET="300", AUTORESEARCH_EVAL_TOKENS="500")
    assert r.returncode == 1  # a batch larger than the evaluation is fine (padded); less than one row is not
    assert one_line(r.stderr) == "AUTORESEARCH_EVAL_TOKENS=500 is less than one row of 512 tokens: raise it"
    val = cache / "data" / prepare.shard_name(prepare.VAL_SHARD)
    val.write_bytes(val.read_bytes()[:-100])  # truncated: its footer is gone
    r = run(train, cache, AUTORESEARCH_TIME_BUDGET="300")
    assert r.returncode == 1 and "step 0" not in r.stdout
    repair = "run `uv run prepare.py` to fetch them again."
    assert one_line(r.stderr) == f"Damaged shard(s) in {cache / 'data'}: {val.name}: {repair}"
    assert time.time() - t0 < 100  # two start-ups, no training


def test_nan_in_evaluation_is_a_failure(use_cache, monkeypatch, capsys):
    class NaNLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, y, reduction="mean"):
            return torch.full((y.numel(),), float("nan")) + self.dummy

    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "2048")
    with pytest.raises(SystemExit) as e:  # no result: the run fails, as train.py's own FAIL lines do
        prepare.evaluate_bpb(NaNLoss(), prepare.Tokenizer.from_directory(), 2)
    assert e.value.code == 1 and capsys.readouterr().out == "FAIL: val_bpb is nan\n"


# ---------------------------------------------------------------------------
# Settings, --help, --check


@pytest.mark.parametrize("name, value, message", [
    ("AUTORESEARCH_TIME_BUDGET", "0", "AUTORESEARCH_TIME_BUDGET='0' must be a positive whole number"),
    ("AUTORESEARCH_TIME_BUDGET", "-5", "AUTORESEARCH_TIME_BUDGET='-5' must be a positive whole number"),
    ("AUTORESEARCH_TIME_BUDGET", "1.5", "AUTORESEARCH_TIME_BUDGET='1.5' must be a positive whole number"),
    ("AUTORESEARCH_EVAL_TOKENS", "0", "AUTORESEARCH_EVAL_TOKENS='0' must be a positive whole number"),
    ("AUTORESEARCH_EVAL_TOKENS", "", "AUTORESEARCH_EVAL_TOKENS='' must be a positive whole number"),
    ("AUTORESEARCH_ATTENTION", "fa3", "AUTORESEARCH_ATTENTION='fa3' must be fa4, flex or sdpa"),
    ("AUTORESEARCH_MLP", "plain", "AUTORESEARCH_MLP is not a setting of autoresearch (--help lists them): unset it"),
    ("AUTORESEARCH_CACHE", "", "AUTORESEARCH_CACHE is empty: name a folder, or unset it for ~/.cache/autoresearch"),
])
def test_every_setting_is_checked_at_start(tmp_path, name, value, message):
    r = run(PREPARE, tmp_path / "cache", "--check", **{name: value})
    assert r.returncode == 1 and one_line(r.stderr) == message
    assert os.listdir(tmp_path) == []  # nothing written, not even where an empty AUTORESEARCH_CACHE would point


def test_train_checks_settings_and_arguments_before_anything_runs(tmp_path):
    train = train_copy(tmp_path)
    r = run(train, tmp_path / "none", AUTORESEARCH_TIME_BUDGET="0")
    assert r.returncode == 1 and one_line(r.stderr) == "AUTORESEARCH_TIME_BUDGET='0' must be a positive whole number"
    for script in (PREPARE, train):
        r = run(script, tmp_path / "none", "--help")
        assert r.returncode == 0 and r.stderr == "" and len(r.stdout.splitlines()) < 40
        assert "AUTORESEARCH_CACHE" in r.stdout and "AUTORESEARCH_TIME_BUDGET" in r.stdout and "step" not in r.stdout
        r = run(script, tmp_path / "none", "--bogus")
        assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
    assert not os.path.exists(tmp_path / "none")  # no cache made


def test_relative_cache_is_resolved_and_check_names_the_repair(tiny_cache, tmp_path):
    r = run(PREPARE, "rel/cache", "--check")  # run() starts prepare.py in the repository's folder
    assert r.returncode == 1
    data = os.path.join(ROOT, "rel", "cache", "data")
    assert r.stdout.splitlines() == [f"cache: {os.path.dirname(data)}",
                                     f"NOT READY: No training shard in {data}: run `uv run prepare.py` first."]
    assert not os.path.exists(os.path.join(ROOT, "rel"))  # --check writes nothing
    cache = copy_cache(tiny_cache, tmp_path)
    r = run(PREPARE, cache, "--check")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "ready: `uv run train.py` can run"
    os.remove(cache / "tokenizer" / "meta.json")
    r = run(PREPARE, cache, "--check")
    assert r.returncode == 1 and r.stdout.splitlines()[-1].endswith("run `uv run prepare.py` to train it again.")


# ---------------------------------------------------------------------------
# Links, full disks, dead runs' leftovers


def test_writes_never_follow_a_link_planted_at_a_temporary_name(use_cache, tmp_path):
    """Someone sharing the cache plants links where this process will write: the files they point to
    stay as they were, and the writes land in the cache."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    source, data = tmp_path / "source", tmp_path / "data"
    make_shards(str(source), n_train=1, docs_per_shard=20, val_docs=10)
    data.mkdir()
    os.symlink(victim, prepare.temp_path(str(data / prepare.shard_name(0))))
    assert prepare.fetch_shard(0, str(data), str(source)) is None
    tok = prepare.Tokenizer.from_directory()
    val = prepare.list_shards("val")[0]
    cache = prepare.token_cache_path(val, tok)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    os.symlink(victim, prepare.temp_path(cache))
    prepare.tokenize_shard(val, tok)
    tokenizer_dir = tmp_path / "tok"
    os.symlink(tmp_path, prepare.temp_path(str(tokenizer_dir)))  # the temporary folder: a link to a folder
    prepare.save_tokenizer(dict(tok.enc._mergeable_ranks), prepare.SPLIT_PATTERN, str(tokenizer_dir))
    assert victim.read_text() == "precious" and not os.path.islink(cache)
    assert prepare.load_tokenized(val, tok) is not None and prepare.Tokenizer.from_directory(str(tokenizer_dir))
    assert prepare.shard_problem(str(data / prepare.shard_name(0))) is None
    assert temps(tmp_path) == [] and temps(prepare.CACHE_DIR) == []


def test_a_full_disk_is_an_error_and_leaves_no_temporary_files(tiny_cache, tmp_path):
    """Writes past a file-size limit fail as on a full disk: prepare.py (saving the tokenizer) and
    train.py (writing the token cache) stop with one line and exit 1, nothing half-written kept."""
    cache = copy_cache(tiny_cache, tmp_path / "cache", parts=("data",))
    r = run(PREPARE, cache, "--num-shards", "3", limit_bytes=50_000)  # the ranks file is larger
    assert r.returncode == 1 and one_line(r.stderr).startswith("prepare: FAILED: [Errno 27] File too large")
    assert sorted(os.listdir(cache)) == [".lock", "data"] and temps(cache) == []
    shutil.copytree(tiny_cache / "tokenizer", cache / "tokenizer")
    r = run(train_copy(tmp_path), cache, limit_bytes=5_000)  # the validation shard's tokens are larger
    assert r.returncode == 1
    assert one_line(r.stderr).startswith("Cannot write the token cache ([Errno 27] File too large")
    assert temps(cache) == [] and not any(n.endswith(".npz") for _, _, files in os.walk(cache) for n in files)


def test_prepare_removes_what_dead_runs_left_in_every_cache_folder(tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: no process has its pid now
    tag = f"{prepare.THIS_HOST}~{dead.pid}~0a1b2c3d"  # a run of this host's, dead
    left = [cache / f".tokenizer~{tag}.tmp", cache / "tokens" / "abc" / f".shard_00000.npz~{tag}.tmp",
            cache / "data" / f".shard_00001.parquet~{tag}.tmp"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
    left[0].mkdir()
    (left[0] / "ranks.tiktoken").write_text("half")
    left[1].write_bytes(b"half")
    left[2].write_bytes(b"half")
    alive = cache / "data" / f".shard_00002.parquet~{prepare.THIS_HOST}~{os.getpid()}~0a1b2c3d.tmp"  # a run going on
    alive.write_bytes(b"in progress")
    r = run(PREPARE, cache, "--num-shards", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert temps(cache) == [str(alive)]


# ---------------------------------------------------------------------------
# Ctrl-C and concurrent runs


def test_ctrl_c_ends_train_with_one_line(tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    train = train_copy(tmp_path)
    proc = subprocess.Popen([sys.executable, train], env=env_with(cache, AUTORESEARCH_TIME_BUDGET="300"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 00002"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err.strip() == "train.py: interrupted"
    assert temps(cache) == []


def test_two_prepares_at_once_on_one_cold_cache(tmp_path):
    """Several agents may share one cache: two prepare.py started together both finish, one after
    the other (a lock), and leave one whole cache. (Two processes: ~20 s on 2 cores.)"""
    source = make_shards(str(tmp_path / "source"), docs_per_shard=200, val_docs=100)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, PREPARE, "--source-dir", source], env=env_with(cache), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [rc for _, _, rc in results] == [0, 0], results
    outs = sorted(out for out, _, _ in results)
    assert sum("waiting for it" in out for out in outs) == 1 and sum("characters read" in out for out in outs) == 1
    assert "3 training shard(s)" in outs[0] and temps(cache) == []
    check = subprocess.run([sys.executable, PREPARE, "--check"], env=env_with(cache), capture_output=True)
    assert check.returncode == 0


def test_a_cache_without_locks_is_worked_on_without_one(tmp_path, monkeypatch, capsys):
    """Some NFS mounts have no lock service (flock fails: ENOLCK). The lock only saves work: the run says
    so and goes on, as safe as runs on two hosts are."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(prepare, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    prepare.lock_cache()
    said = capsys.readouterr().out
    assert said == f"prepare: cannot lock {tmp_path} (No locks available): working without the lock\n"


def test_two_trains_at_once_on_a_cold_token_cache(tiny_cache, tmp_path):
    """Both tokenize the same shards and publish them by rename; both finish with a result.
    (Two training processes side by side: ~40 s on 2 cores.)"""
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    train = train_copy(tmp_path)
    procs = [subprocess.Popen([sys.executable, train], env=env_with(cache, AUTORESEARCH_TIME_BUDGET="2"), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0 and "\nval_bpb:" in out, err[-3000:]
    assert temps(cache) == [] and len(os.listdir(cache / "tokens")) == 1


# ---------------------------------------------------------------------------
# A newcomer's first commands, from a fresh copy of the project


def test_newcomer_without_network_is_told_the_way_and_it_works(tmp_path):
    project = tmp_path / "autoresearch"
    project.mkdir()
    for name in PROJECT_FILES:
        shutil.copy(os.path.join(ROOT, name), project)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    cache = tmp_path / "cache"
    t0 = time.time()
    r = run(str(project / "prepare.py"), cache, HF_ENDPOINT=f"http://127.0.0.1:{port}")  # the README's first command
    assert time.time() - t0 < 15 and r.returncode == 1
    assert "--source-dir" in one_line(r.stderr) and "Run it again" not in r.stdout + r.stderr
    sample = sample_data_dir()
    # one real shard (~15 s on 2 cores), or every synthetic one (one holds too little text for 8192 tokens)
    limit = ["--num-shards", "1"] if sample else []
    r = run(str(project / "prepare.py"), cache, "--source-dir", sample or make_shards(str(tmp_path / "shards")), *limit)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("prepare: done") and "characters read" in r.stdout
    r = run(str(project / "prepare.py"), cache, "--check")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "ready: `uv run train.py` can run"
