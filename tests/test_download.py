"""Shard fetching against a real HTTP mirror on 127.0.0.1: retries, final 4xx, truncated bodies,
an interrupted run resumed, damaged shards already in the cache, the --source-dir copy, servers that
trickle, and a cache shared with another host.

The mirror is a ThreadingHTTPServer whose answer for each file is scripted by the test, and which
counts the requests per file so a test can tell what was (not) downloaded again."""

import collections
import glob
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, synthetic_documents, write_shard

import prepare

PREFIX = f"/datasets/{prepare.DATASET}/resolve/main/"
TRAIN = [0, 1, 2]
ALL = TRAIN + [prepare.VAL_SHARD]
SHARD_DOCS = {0: 200, 1: 200, 2: 200, prepare.VAL_SHARD: 150}
FAST = 0.01  # back-off for in-process fetches: retries without waiting seconds


# ---------------------------------------------------------------------------
# The mirror


class Mirror:
    """Scripted answers per file name; any file without one is a 404."""

    def __init__(self):
        self.routes = {}
        self.requests = collections.Counter()
        self.lock = threading.Lock()
        self.closing = threading.Event()  # set at teardown: slow answers stop sleeping
        self.url = None

    def count(self, index):
        with self.lock:
            return self.requests[prepare.shard_name(index)]

    def reset_counts(self):
        with self.lock:
            self.requests.clear()

    # -- behaviours: each is handler(request, n) where n is the file's request number, from 1

    def serve(self, index, data):
        self.routes[prepare.shard_name(index)] = lambda h, n: h.send_body(data)

    def fail_then_serve(self, index, data, failures, status=500):
        def answer(h, n):
            if n <= failures:
                h.send_error(status)
            else:
                h.send_body(data)

        self.routes[prepare.shard_name(index)] = answer

    def always(self, index, status):
        self.routes[prepare.shard_name(index)] = lambda h, n: h.send_error(status)

    def truncate(self, index, data, times=None):
        """The full Content-Length is declared, half the bytes sent, then the connection closed:
        the first `times` requests (every one when None), the whole file afterwards."""

        def answer(h, n):
            cut = len(data) // 2 if times is None or n <= times else None
            h.send_body(data, limit=cut)

        self.routes[prepare.shard_name(index)] = answer

    def slow(self, index, data, chunk=4096, delay=0.25):
        """Chunks with a pause after each; the returned event is set once the first one is out."""
        started = threading.Event()

        def answer(h, n):
            h.send_body(data, chunk=chunk, delay=delay, started=started)

        self.routes[prepare.shard_name(index)] = answer
        return started

    def redirect(self, index, location, headers=()):
        """A 302 to `location` (a path here, or a whole URL), with extra headers, as Hugging Face
        answers for a file in LFS storage (X-Linked-Etag, X-Linked-Size)."""

        def answer(h, n):
            h.send_response(302)
            h.send_header("Location", location)
            for key, value in headers:
                h.send_header(key, value)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[prepare.shard_name(index)] = answer


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        mirror = self.server.mirror
        name = self.path[len(PREFIX):] if self.path.startswith(PREFIX) else self.path
        with mirror.lock:
            mirror.requests[name] += 1
            n = mirror.requests[name]
        answer = mirror.routes.get(name)
        try:
            if answer is None:
                self.send_error(404)
            else:
                answer(self, n)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (killed mid-download): nothing to answer

    def send_body(self, data, limit=None, chunk=None, delay=0.0, started=None, headers=()):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        body = data if limit is None else data[:limit]
        step = chunk or len(body)
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            self.wfile.flush()
            if started is not None:
                started.set()
            if delay and self.server.mirror.closing.wait(delay):
                break
        self.close_connection = True  # a short body ends with the connection closed

    def log_message(self, format, *args):
        pass


@pytest.fixture
def mirror(monkeypatch):
    m = Mirror()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.mirror = m
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    m.url = f"http://127.0.0.1:{server.server_address[1]}"
    # in-process fetches read HF_ENDPOINT at call time; a proxy must not intercept the mirror
    monkeypatch.setenv("HF_ENDPOINT", m.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    try:
        yield m
    finally:
        m.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------------------
# Shards and checks


@pytest.fixture(scope="session")
def shard_bytes(tmp_path_factory):
    """The bytes of small real-ish shards, made once: {index: bytes}."""
    folder = tmp_path_factory.mktemp("served")
    out = {}
    for i in ALL:
        path = folder / prepare.shard_name(i)
        write_shard(str(path), synthetic_documents(SHARD_DOCS[i], seed=100 + i))
        out[i] = path.read_bytes()
    return out


def shard_path(data_dir, index):
    return os.path.join(str(data_dir), prepare.shard_name(index))


def temp_files(data_dir):
    return sorted(n for n in os.listdir(data_dir) if n.endswith(".tmp")) if os.path.isdir(data_dir) else []


def assert_shard(data_dir, index, shard_bytes):
    path = shard_path(data_dir, index)
    assert prepare.shard_problem(path) is None, f"{path} is not a valid shard"
    assert pq.ParquetFile(path).metadata.num_rows == SHARD_DOCS[index]
    with open(path, "rb") as f:
        assert f.read() == shard_bytes[index]


def assert_final_names_complete(data_dir, shard_bytes):
    """Every file under a final shard name is a whole shard: never a partial one."""
    for name in os.listdir(data_dir):
        if name.startswith("shard_") and name.endswith(".parquet"):
            assert_shard(data_dir, int(name[6:11]), shard_bytes)


def cli_env(cache, url):
    env = dict(os.environ)
    env.update(AUTORESEARCH_CACHE=str(cache), HF_ENDPOINT=url, NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    return env


def cli_args(*extra, num_shards=3):
    shards = [] if num_shards is None else ["--num-shards", str(num_shards)]
    return [sys.executable, os.path.join(ROOT, "prepare.py"), *shards, *extra]


def run_cli(cache, url, *extra, timeout=60, num_shards=3):
    return subprocess.run(cli_args(*extra, num_shards=num_shards), env=cli_env(cache, url), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def dead_pid():
    """A pid that no process has now (a child's, reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------------------
# fetch_shard in process


@pytest.mark.parametrize("status", [500, 503, 408, 429])
def test_transient_errors_are_retried(mirror, shard_bytes, tmp_path, status):
    mirror.fail_then_serve(1, shard_bytes[1], failures=2, status=status)
    logs = []
    assert prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=logs.append) is None
    assert mirror.count(1) == 3
    assert_shard(tmp_path, 1, shard_bytes)
    assert temp_files(tmp_path) == []
    assert len(logs) == 2 and all(str(status) in line for line in logs)


def test_retries_back_off_exponentially(mirror, shard_bytes, tmp_path, monkeypatch):
    mirror.fail_then_serve(1, shard_bytes[1], failures=3)
    waits = []
    monkeypatch.setattr(prepare._STOP, "wait", waits.append)  # the back-off waits on Ctrl-C's event
    assert prepare.fetch_shard(1, str(tmp_path), attempts=4, backoff=0.5, log=lambda _: None) is None
    assert waits == [0.5, 1.0, 2.0]


def test_fetch_shards_reports_only_failures(mirror, shard_bytes, tmp_path):
    mirror.fail_then_serve(0, shard_bytes[0], failures=2)
    mirror.serve(2, shard_bytes[2])
    failed = prepare.fetch_shards([0, 1, 2], str(tmp_path), workers=3, backoff=FAST)
    assert list(failed) == [1] and "404" in failed[1]
    assert_shard(tmp_path, 0, shard_bytes)
    assert_shard(tmp_path, 2, shard_bytes)
    assert (mirror.count(0), mirror.count(1), mirror.count(2)) == (3, 1, 1)
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("status", [404, 403])
def test_final_4xx_is_not_retried(mirror, tmp_path, status):
    mirror.always(1, status)
    reason = prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None)
    assert reason is not None and f"HTTP {status}" in reason and "\n" not in reason
    assert mirror.count(1) == 1
    assert os.listdir(tmp_path) == []  # neither the final name nor a temp file


def test_truncated_once_is_retried_and_never_saved_partial(mirror, shard_bytes, tmp_path):
    mirror.truncate(1, shard_bytes[1], times=1)
    final = shard_path(tmp_path, 1)
    seen = []  # between attempts: is anything under the final name, or a temp file?
    log = lambda line: seen.append((os.path.exists(final), temp_files(tmp_path), line))  # noqa: E731
    assert prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=log) is None
    assert mirror.count(1) == 2
    assert len(seen) == 1 and seen[0][:2] == (False, [])
    assert_shard(tmp_path, 1, shard_bytes)
    assert temp_files(tmp_path) == []


def test_always_truncated_fails_after_every_attempt(mirror, shard_bytes, tmp_path):
    mirror.truncate(1, shard_bytes[1])
    final = shard_path(tmp_path, 1)
    seen = []
    log = lambda line: seen.append(os.path.exists(final))  # noqa: E731
    reason = prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=log)
    assert reason is not None and f"after {prepare.DOWNLOAD_ATTEMPTS} attempts" in reason
    assert mirror.count(1) == prepare.DOWNLOAD_ATTEMPTS == 3
    assert seen == [False] * 2
    assert os.listdir(tmp_path) == []


def test_complete_body_that_is_not_parquet_is_rejected(mirror, tmp_path):
    """A 200 whose body is whole but no shard (a proxy's error page) never gets the final name;
    the whole body arrived, so asking again would bring the same."""
    page = b"<html><body>Service temporarily unavailable</body></html>"
    mirror.routes[prepare.shard_name(1)] = lambda h, n: h.send_body(page)
    reason = prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None)
    assert reason == "not valid parquet with a text column"
    assert mirror.count(1) == 1
    assert os.listdir(tmp_path) == []


def test_stale_temps_of_dead_runs_are_removed_and_only_those(tmp_path):
    """A temporary name says host~pid~random. This host's: kept while its process lives. Another host's
    (a cache on NFS): its pid means nothing here, so kept until untouched for STALE_TEMP_SECONDS."""
    dead, here, other = dead_pid(), prepare.THIS_HOST, "node7.cluster"
    old = time.time() - prepare.STALE_TEMP_SECONDS - 60
    names = {  # name: (age, kept)
        f".shard_00001.parquet~{here}~{dead}~0a1b2c3d.tmp": (None, False),  # this host, process gone
        f".shard_00002.parquet~{here}~{os.getpid()}~0a1b2c3d.tmp": (None, True),  # this host, alive
        f".shard_00003.parquet~{other}~{dead}~0a1b2c3d.tmp": (None, True),  # another host's, in progress
        f".shard_00004.parquet~{other}~{dead}~0a1b2c3d.tmp": (old, False),  # another host's, long dead
        f".shard_00005.parquet~{here}~{os.getpid()}~0a1b2c3d.tmp": (old, False),  # its pid taken again since
        ".shard_00006.parquet.12345.tmp": (old, True),  # not a temporary name of prepare.py's: never touched
        "shard_00007.parquet": (old, True),
    }
    for name, (age, _) in names.items():
        (tmp_path / name).write_bytes(b"x")
        if age:
            os.utime(tmp_path / name, (age, age))
    prepare.remove_stale_temps(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(name for name, (_, kept) in names.items() if kept)


def test_temporary_names_differ_between_hosts_and_runs(tmp_path):
    """Two hosts may share a host name and a pid (containers, pid namespaces): the random part still
    tells their files apart. Each run of prepare.py draws its own."""
    code = "import prepare; print(prepare.temp_path('/cache/data/shard_00001.parquet'))"
    names = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip()
             for _ in range(2)}
    assert len(names) == 2
    for name in names:
        match = prepare.TEMP_NAME.fullmatch(os.path.basename(name))
        assert match and match["host"] == prepare.THIS_HOST and name.startswith("/cache/data/.shard_00001.parquet~")


# ---------------------------------------------------------------------------
# The command line


def test_interrupted_run_resumes_without_downloading_again(mirror, shard_bytes, tmp_path):
    data = tmp_path / "data"
    for i in (0, 1, prepare.VAL_SHARD):
        mirror.serve(i, shard_bytes[i])
    started = mirror.slow(2, shard_bytes[2])  # one worker: 0, 1, then 2 crawls along
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cli_args("--download-workers", "1"), env=cli_env(tmp_path, mirror.url),
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    pattern = str(data / f".{prepare.shard_name(2)}~{prepare.THIS_HOST}~{proc.pid}~*.tmp")
    try:
        assert started.wait(30), "the first run never asked for shard 2"
        deadline = time.time() + 10
        while not glob.glob(pattern) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert glob.glob(pattern), "no temp file while shard 2 was downloading"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped, so the next run sees the pid as dead
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert mirror.count(2) == 1 and mirror.count(prepare.VAL_SHARD) == 1  # the validation shard comes first
    assert not os.path.exists(shard_path(data, 2))
    assert_final_names_complete(data, shard_bytes)
    assert {0, 1, prepare.VAL_SHARD} <= {i for i in ALL if os.path.exists(shard_path(data, i))}

    mirror.serve(2, shard_bytes[2])
    mirror.reset_counts()
    r = run_cli(tmp_path, mirror.url, "--download-workers", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    for i in ALL:
        assert_shard(data, i, shard_bytes)
    assert (mirror.count(0), mirror.count(1), mirror.count(prepare.VAL_SHARD)) == (0, 0, 0)  # done in the first run
    assert mirror.count(2) == 1
    assert temp_files(data) == []  # the killed run's, among others
    assert "3/4 shards already" in r.stdout


def test_a_run_here_keeps_another_hosts_download_in_progress(mirror, shard_bytes, tmp_path):
    """A cache shared by several hosts (a home folder on NFS): another host's temporary file, still being
    written, names a pid that no process here has. A run here keeps it; one left for hours is removed."""
    data = tmp_path / "data"
    data.mkdir()
    for i in ALL:
        mirror.serve(i, shard_bytes[i])
    dead, old = dead_pid(), time.time() - prepare.STALE_TEMP_SECONDS - 60
    in_progress = data / f".{prepare.shard_name(2)}~node7~{dead}~0a1b2c3d.tmp"
    abandoned = data / f".{prepare.shard_name(1)}~node7~{dead}~4e5f6a7b.tmp"
    for path in (in_progress, abandoned):
        path.write_bytes(b"part of a shard")
    os.utime(abandoned, (old, old))
    r = run_cli(tmp_path, mirror.url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert temp_files(data) == [in_progress.name]
    for i in ALL:
        assert_shard(data, i, shard_bytes)


def pid_taken(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def unshare_works():
    try:
        return subprocess.run(["unshare", "--pid", "--uts", "--fork", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not shutil.which("unshare") or not unshare_works(),
                    reason="unshare --pid --uts is not allowed here (it needs root or user namespaces)")
def test_two_hosts_on_one_cache(mirror, shard_bytes, tmp_path, tiny_cache):
    """Another host for real: prepare.py in pid and UTS namespaces of its own (host name nodeB, a pid
    that no process has here) fetches into the same cache. While its download is under way, this host
    removes stale temporary files, as its runs do first (its lock may not reach nodeB: flock on NFS).
    nodeB's file stays, and nodeB finishes with every shard whole."""
    shutil.copytree(tiny_cache / "tokenizer", tmp_path / "tokenizer")  # nodeB only fetches
    for i in (0, 1, prepare.VAL_SHARD):
        mirror.serve(i, shard_bytes[i])
    started = mirror.slow(2, shard_bytes[2], chunk=8192, delay=0.05)
    pid = next(p for p in range(300, 30000) if not any(pid_taken(q) for q in range(p - 3, p + 4)))
    # in the new pid namespace: sh is 1, hostname 2, each /bin/true one more, then prepare.py
    script = f'hostname nodeB && i=3; while [ $i -lt {pid} ]; do /bin/true; i=$((i+1)); done; "$0" "$@"'
    command = ["unshare", "--pid", "--uts", "--fork", "sh", "-c", script, *cli_args("--download-workers", "1")]
    proc = subprocess.Popen(command, env=cli_env(tmp_path, mirror.url), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert started.wait(30), "nodeB never asked for shard 2"
        pattern = str(tmp_path / "data" / f".{prepare.shard_name(2)}~nodeB~*~*.tmp")
        deadline = time.time() + 10
        while not glob.glob(pattern) and time.time() < deadline:
            time.sleep(0.01)
        (temp,) = glob.glob(pattern)
        assert not pid_taken(int(prepare.TEMP_NAME.fullmatch(os.path.basename(temp))["pid"]))
        prepare.remove_stale_temps(str(tmp_path / "data"))
        assert os.path.exists(temp), "nodeB's download in progress was removed"
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    for i in ALL:
        assert_shard(tmp_path / "data", i, shard_bytes)


def test_damaged_shards_in_cache_are_fetched_again(mirror, shard_bytes, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in ALL:
        mirror.serve(i, shard_bytes[i])
        (data / prepare.shard_name(i)).write_bytes(shard_bytes[i])
    (data / prepare.shard_name(0)).write_bytes(shard_bytes[0][: len(shard_bytes[0]) // 2])
    (data / prepare.shard_name(2)).write_bytes(b"this is not a parquet file\n")
    r = run_cli(tmp_path, mirror.url)
    assert r.returncode == 0, r.stdout + r.stderr
    for i in ALL:
        assert_shard(data, i, shard_bytes)
    assert {i: mirror.count(i) for i in ALL} == {0: 1, 1: 0, 2: 1, prepare.VAL_SHARD: 0}
    assert "2/4 shards already" in r.stdout
    assert temp_files(data) == []


def test_cli_names_missing_shards_and_exits_non_zero(mirror, shard_bytes, tmp_path):
    mirror.serve(0, shard_bytes[0])
    mirror.serve(prepare.VAL_SHARD, shard_bytes[prepare.VAL_SHARD])
    mirror.always(2, 404)  # shard 1 has no route: a 404 as well
    r = run_cli(tmp_path, mirror.url)
    assert r.returncode != 0
    assert "2 shard(s) missing: shard_00001.parquet, shard_00002.parquet" in r.stderr
    assert "HTTP 404" in r.stdout
    assert (mirror.count(1), mirror.count(2)) == (1, 1)  # a 404 is final: asked once
    data = tmp_path / "data"
    assert sorted(n for n in os.listdir(data)) == [prepare.shard_name(0), prepare.shard_name(prepare.VAL_SHARD)]
    assert_final_names_complete(data, shard_bytes)
    assert not (tmp_path / "tokenizer").exists()  # nothing is trained on a partial download


def test_source_dir_copies_shards(mirror, shard_bytes, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for i in ALL:
        (source / prepare.shard_name(i)).write_bytes(shard_bytes[i])
    cache = tmp_path / "cache"
    r = run_cli(cache, mirror.url, "--source-dir", str(source))
    assert r.returncode == 0, r.stdout + r.stderr
    for i in ALL:
        assert_shard(cache / "data", i, shard_bytes)
    assert sum(mirror.requests.values()) == 0  # nothing downloaded
    assert temp_files(cache / "data") == []
    assert (cache / "tokenizer" / "ranks.tiktoken").exists()


def test_source_dir_names_missing_and_invalid_shards(mirror, shard_bytes, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for i in (0, prepare.VAL_SHARD):
        (source / prepare.shard_name(i)).write_bytes(shard_bytes[i])
    (source / prepare.shard_name(2)).write_bytes(shard_bytes[2][:1000])  # shard 1 absent, 2 cut short
    cache = tmp_path / "cache"
    r = run_cli(cache, mirror.url, "--source-dir", str(source))
    assert r.returncode != 0
    assert "2 shard(s) missing: shard_00001.parquet, shard_00002.parquet" in r.stderr
    assert f"not in {source}" in r.stdout and "not valid parquet" in r.stdout
    assert "Run it again" not in r.stderr  # running again cannot help: the folder must change
    data = cache / "data"
    assert sorted(os.listdir(data)) == [prepare.shard_name(0), prepare.shard_name(prepare.VAL_SHARD)]
    assert_final_names_complete(data, shard_bytes)
    assert sum(mirror.requests.values()) == 0


def test_ctrl_c_stops_at_once_and_starts_no_queued_download(mirror, shard_bytes, tmp_path):
    """SIGINT mid-download: one short line, exit 130, the shard under way stopped and its temporary
    file removed, the queued ones never started."""
    data = tmp_path / "data"
    for i in (0, 2, prepare.VAL_SHARD):
        mirror.serve(i, shard_bytes[i])
    started = mirror.slow(1, shard_bytes[1], chunk=1024, delay=0.2)  # ~20 s if left to finish
    proc = subprocess.Popen(cli_args("--download-workers", "1"), env=cli_env(tmp_path, mirror.url),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert started.wait(30), "the run never asked for shard 1"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert err.strip() == "prepare.py: interrupted" and "Traceback" not in out
    assert mirror.count(2) == 0
    assert sorted(os.listdir(data)) == [prepare.shard_name(0), prepare.shard_name(prepare.VAL_SHARD)]  # no temp file
    assert not (tmp_path / "tokenizer").exists()


def test_source_copy_error_is_a_reason_not_a_crash(shard_bytes, tmp_path):
    source, data = tmp_path / "source", tmp_path / "data"
    (source / prepare.shard_name(1)).mkdir(parents=True)  # exists, but cannot be copied
    (source / prepare.shard_name(2)).write_bytes(shard_bytes[2])
    failed = prepare.fetch_shards([1, 2], str(data), workers=2, source_dir=str(source))
    assert list(failed) == [1] and failed[1] == f"cannot copy {source / prepare.shard_name(1)}: Is a directory"
    assert sorted(os.listdir(data)) == [prepare.shard_name(2)]
    assert_shard(data, 2, shard_bytes)


@pytest.mark.parametrize("num_shards", [None, -1], ids=["by default", "--num-shards -1"])
def test_source_dir_all_shards_ignores_other_names(mirror, shard_bytes, tmp_path, num_shards):
    """A folder gives every training shard in it, by exact name only, unless --num-shards says otherwise."""
    source = tmp_path / "source"
    source.mkdir()
    for i in ALL:
        (source / prepare.shard_name(i)).write_bytes(shard_bytes[i])
    (source / "shard_notes.parquet").write_bytes(b"notes")
    (source / "shard_00001 (copy).parquet").write_bytes(shard_bytes[1])
    cache = tmp_path / "cache"
    r = run_cli(cache, mirror.url, "--source-dir", str(source), num_shards=num_shards)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 training shard(s) + validation" in r.stdout
    assert sorted(os.listdir(cache / "data")) == sorted(prepare.shard_name(i) for i in ALL)
    for i in ALL:
        assert_shard(cache / "data", i, shard_bytes)


# ---------------------------------------------------------------------------
# Faults: poison shards, slow servers, foreign redirects, wrong checksums, no network


def shard_of(docs, column_type=None):
    """The bytes of a parquet file with these documents as its `text` column."""
    import io

    import pyarrow as pa

    out = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(docs, type=column_type)}), out)
    return out.getvalue()


@pytest.mark.parametrize("docs, column_type, problem", [
    (["fine", None, "fine"], None, "row 1 holds None, not text"),
    ([1, 2, 3], None, "row 0 holds 1, not text"),
    (["fine", "also fine", " " * 1_000_000], None, "row 2 cannot be tokenized"),  # the tokenizer's regex gives up
], ids=["null row", "not strings", "a million spaces"])
def test_a_shard_that_cannot_be_tokenized_is_never_kept(mirror, shard_bytes, tmp_path, docs, column_type, problem):
    """Poison that used to stick: the shard reads, but train.py could not tokenize it. It is refused,
    not retried (the whole file came), named with its row, and taken once the source is fixed."""
    mirror.serve(1, shard_of(docs, column_type))
    reason = prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None)
    assert reason is not None and reason.startswith(problem), reason
    assert mirror.count(1) == 1 and os.listdir(tmp_path) == []
    mirror.serve(1, shard_bytes[1])  # the source is fixed
    assert prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None) is None
    assert_shard(tmp_path, 1, shard_bytes)


@pytest.fixture
def small_floor(monkeypatch):
    """The progress floor scaled down, so that the tests take seconds: 8 KiB in each window of 0.4 s."""
    monkeypatch.setattr(prepare, "PROGRESS_WINDOW_SECONDS", 0.4)
    monkeypatch.setattr(prepare, "PROGRESS_FLOOR_BYTES", 2**13)


def test_a_trickling_server_is_given_up_on_and_ends_the_run(mirror, shard_bytes, tmp_path, small_floor):
    """Each read gets a few bytes in time, so only the floor can end it: each attempt is given up on
    after a window, and after the last the run ends with one line and the ways out (the other shards,
    from the same server, would trickle too)."""
    mirror.slow(1, shard_bytes[1], chunk=64, delay=0.1)  # 640 bytes a second: minutes for the shard
    t0 = time.time()
    with pytest.raises(prepare.NotReady) as e:
        prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None)
    assert time.time() - t0 < 2 * prepare.DOWNLOAD_ATTEMPTS
    assert str(e.value).startswith("prepare: downloads are too slow (127.0.0.1 sent less than 8,192 bytes in 0.4 s; "
                                   "3 attempts): try again later. Ways out: copy shards")
    assert mirror.count(1) == prepare.DOWNLOAD_ATTEMPTS and os.listdir(tmp_path) == []


def test_a_server_that_goes_silent_is_given_up_on(mirror, shard_bytes, tmp_path, monkeypatch):
    """Headers, then not one byte: each read waits READ_SECONDS at most, and the run ends as for a trickle."""
    monkeypatch.setattr(prepare, "READ_SECONDS", 0.3)

    def silent(h, n):
        h.send_response(200)
        h.send_header("Content-Length", str(len(shard_bytes[1])))
        h.end_headers()
        h.wfile.flush()
        mirror.closing.wait(3)

    mirror.routes[prepare.shard_name(1)] = silent
    t0 = time.time()
    with pytest.raises(prepare.NotReady, match=r"^prepare: downloads are too slow \(127\.0\.0\.1 sent nothing for 0"):
        prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None)
    assert time.time() - t0 < 3 and mirror.count(1) == prepare.DOWNLOAD_ATTEMPTS and os.listdir(tmp_path) == []


def test_a_stalled_download_is_tried_again(mirror, shard_bytes, tmp_path, small_floor):
    """The first answer trickles, the second comes whole: the shard arrives at the second attempt."""
    def answer(h, n):
        h.send_body(shard_bytes[1], chunk=64 if n == 1 else None, delay=0.1 if n == 1 else 0.0)

    mirror.routes[prepare.shard_name(1)] = answer
    logs = []
    assert prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=logs.append) is None
    assert mirror.count(1) == 2 and len(logs) == 1 and "sent less than 8,192 bytes" in logs[0]
    assert_shard(tmp_path, 1, shard_bytes)


def test_a_slow_but_steady_link_completes(mirror, shard_bytes, tmp_path, small_floor):
    """Above the floor a download is never cut, however long it takes (here several windows)."""
    mirror.slow(1, shard_bytes[1], chunk=8192, delay=0.05)  # ~160 KB/s, eight times the floor: ~1.5 s
    t0 = time.time()
    assert prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None) is None
    assert time.time() - t0 > 3 * prepare.PROGRESS_WINDOW_SECONDS
    assert mirror.count(1) == 1
    assert_shard(tmp_path, 1, shard_bytes)


def test_the_cli_ends_a_trickle_with_one_line(mirror, shard_bytes, tmp_path):
    """prepare.py itself, its floor scaled down as above: every download stops (a queued one may just
    have begun), and the run ends in one line, exit 1, with no temporary file left."""
    for i in ALL:
        mirror.slow(i, shard_bytes[i], chunk=64, delay=0.1)
    code = ("import sys, prepare; prepare.PROGRESS_WINDOW_SECONDS, prepare.PROGRESS_FLOOR_BYTES = 0.4, 2**13; "
            "prepare.BACKOFF_SECONDS = 0.01; sys.argv[1:] = ['--num-shards', '3', '--download-workers', '2']; "
            "prepare.main()")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(tmp_path, mirror.url), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 10 and r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert r.stderr.startswith("prepare: downloads are too slow (127.0.0.1 sent less than 8,192 bytes in 0.4 s")
    assert sorted(mirror.requests.values(), reverse=True) in ([3, 3], [3, 3, 1], [3, 3, 1, 1])  # two workers
    assert temp_files(tmp_path / "data") == []


def test_the_default_floor_ends_a_trickle_well_within_three_minutes():
    """By the constants, not by waiting. A server that answers, then trickles, costs an attempt at most
    its connection, one window and the read under way when the window closes; then come the back-offs.
    Every download stops together (the shards are fetched in parallel): the run's bound is one shard's.
    The floor is about 1 MB a minute: a link faster than that is never cut, however large the shard."""
    attempt = prepare.CONNECT_SECONDS + prepare.PROGRESS_WINDOW_SECONDS + prepare.READ_SECONDS
    backoffs = sum(prepare.BACKOFF_SECONDS * 2**i for i in range(prepare.DOWNLOAD_ATTEMPTS - 1))
    assert prepare.DOWNLOAD_ATTEMPTS * attempt + backoffs == 156 < 180
    assert prepare.PROGRESS_FLOOR_BYTES / prepare.PROGRESS_WINDOW_SECONDS * 60 == 2**20
    assert prepare.STALE_TEMP_SECONDS > 10 * attempt  # another host's temporary file is never judged too early


def test_redirects_stay_on_the_configured_host(mirror, shard_bytes, tmp_path):
    port = mirror.url.rsplit(":", 1)[1]
    mirror.redirect(1, f"http://localhost:{port}/elsewhere/{prepare.shard_name(1)}")  # another host name
    reason = prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None)
    assert reason == "redirected to localhost, not a host of 127.0.0.1: refused"
    assert mirror.requests[f"/elsewhere/{prepare.shard_name(1)}"] == 0 and os.listdir(tmp_path) == []
    mirror.routes["/blobs/1"] = lambda h, n: h.send_body(shard_bytes[1])
    mirror.redirect(1, "/blobs/1")  # the same host: followed
    assert prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None) is None
    assert_shard(tmp_path, 1, shard_bytes)


def test_the_published_sha256_and_size_are_checked(mirror, shard_bytes, tmp_path):
    """As on Hugging Face: the resolve answer is a redirect that carries the file's sha256 and size."""
    import hashlib

    mirror.routes["/blobs/1"] = lambda h, n: h.send_body(shard_bytes[1])
    right = hashlib.sha256(shard_bytes[1]).hexdigest()
    wrong = [([("X-Linked-Etag", f'"{"0" * 64}"')], "sha256 "), ([("X-Linked-Size", "123")], "truncated")]
    for headers, problem in wrong:
        mirror.redirect(1, "/blobs/1", headers)
        reason = prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None)
        assert reason.startswith(problem) and reason.endswith(f"(after {prepare.DOWNLOAD_ATTEMPTS} attempts)"), reason
        assert os.listdir(tmp_path) == []
    mirror.redirect(1, "/blobs/1", [("X-Linked-Etag", f'"{right}"'), ("X-Linked-Size", str(len(shard_bytes[1])))])
    assert prepare.fetch_shard(1, str(tmp_path), backoff=FAST, log=lambda _: None) is None
    assert_shard(tmp_path, 1, shard_bytes)


def test_unreachable_source_fails_fast_with_one_helpful_message(tmp_path):
    """No retries for a host that refuses connections: one message naming it and the ways out."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    t0 = time.time()
    r = run_cli(tmp_path, f"http://127.0.0.1:{port}", num_shards=None)
    assert time.time() - t0 < 15
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert r.stderr.startswith("prepare: cannot reach 127.0.0.1 ([Errno 111] Connection refused)")
    assert all(way in r.stderr for way in ("--source-dir", "HF_ENDPOINT", "AUTORESEARCH_CACHE"))
    assert "again" not in r.stdout + r.stderr and len(r.stdout.splitlines()) == 2  # the cache, the data line


def test_a_name_lookup_that_hangs_is_cut_off(tmp_path, monkeypatch):
    """requests' timeouts do not cover resolving the host name: a lookup that hangs (a broken DNS)
    ends the run with the same one-line way out, not a wait of minutes."""
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(prepare, "NAME_LOOKUP_SECONDS", 0.5)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    t0 = time.time()
    with pytest.raises(prepare.NotReady, match=r"^prepare: cannot reach mirror\.example \(its name did not resolve in"):
        prepare.fetch_shards([0], str(tmp_path / "data"))
    assert time.time() - t0 < 5


def test_a_name_that_does_not_resolve_is_one_message_at_once(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    with pytest.raises(prepare.NotReady, match=r"^prepare: cannot reach mirror\.example \(\[Errno -3\] Temporary"):
        prepare.fetch_shards([0], str(tmp_path / "data"))
