"""program.md's third way, waves on a Ray cluster, played for real: a cluster of two nodes on this
machine (a head and a worker, one logical GPU each, started with `ray start` from the lock's
`cluster` group, token authentication on), the agent's commands taken from program.md as
test_loop.py takes them, and every candidate a Ray job that runs the real uv, prepare.py and
train.py of its worktree on the CPU. Rows are logged and decided as in test_loop.py's waves: step
1's BEST command (each `RERUN` a wave of one that runs the tip again, logged `re-run`), step 6's
`again` for every candidate and the rest of its rule for the wave's winner. One night: the cluster
check, a submission without the token (refused), a baseline wave, a wave of three candidates on two
GPUs (two at once, the third queued; one crashes), a wave whose worker node is killed mid-run, and
a wave on the node that is left whose job hangs and is stopped.

Marked `cluster` and deselected by default: CI runs it in its own step (`uv run --group cluster
pytest -m cluster`, ~3 to 5 minutes on 2 cores, by how many re-runs the BEST command asks for).
Test knobs, on the nodes: the tiny cache through AUTORESEARCH_CACHE, AUTORESEARCH_TIME_BUDGET=2,
AUTORESEARCH_EVAL_TOKENS=8192, HOME in a scratch folder (the token in Ray's default file there, the
jobs' uv environment beside it) with uv's own cache kept; on the agent's side the time a wave waits is
shortened so that a failure cannot hang CI.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

import test_loop as loop

pytestmark = pytest.mark.cluster
TAG = loop.TAG
WAVE_TIMEOUT = "120"  # replaces the 1800 s that program.md's wave waits at most: a tiny run takes ~20 s here
# and its `sleep 10` between two looks at a job's status becomes `sleep 3` (each look starts Ray's CLI: ~1 s of CPU)
# a sure discard (test_loop's worse idea of the second night) that sleeps first: still running when its node dies
SLOW = (loop.WORSE[0], loop.WORSE[1] + '; __import__("time").sleep(20)', loop.WORSE[2] + ", sleeps 20 s first")
HANG = (loop.BETTER[1], loop.BETTER[1] + '; __import__("time").sleep(500)', "hangs (sleep 500 s)")
NARROW = ("self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd",
          "self.c_fc = nn.Linear(config.n_embd, 3 * config.n_embd", "narrower MLP (3x)")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_pids(marker):
    """Processes whose environment holds marker (every process a test node starts inherits it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def kill_marked(marker):
    """SIGKILL every process carrying marker, until none is left (bounded)."""
    for _ in range(50):
        pids = marked_pids(marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes {marked_pids(marker)} outlived SIGKILL")


@dataclass
class Cluster:
    address: str  # the head's job server, as RAY_ADDRESS names it
    token: str
    marker: str  # in the environment of every process of this cluster
    nodes: dict  # {"head" | "worker": the `ray start --block` process}

    def get(self, path):
        r = requests.get(self.address + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        r.raise_for_status()
        return r.json()

    def jobs(self):
        return {job["submission_id"]: job for job in self.get("/api/jobs/")}

    def alive_nodes(self):
        """{node id: is head} of the nodes the cluster counts alive, with a GPU each."""
        nodes = self.get("/api/v0/nodes?detail=1")["data"]["result"]["result"]
        return {n["node_id"]: n["is_head_node"] for n in nodes
                if n["state"] == "ALIVE" and n["resources_total"].get("GPU")}

    def wait(self, what, condition, timeout):
        """Polls condition() until it is true; fails after timeout seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.3)
        try:
            jobs = {k: (j["status"], (j["driver_node_id"] or "")[:8], j["message"]) for k, j in self.jobs().items()}
            nodes = self.alive_nodes()
        except requests.RequestException as e:
            jobs = nodes = e
        raise AssertionError(f"{what}: not within {timeout} s; nodes alive: {nodes}; the jobs: {jobs}")

    def kill(self, name):
        """The node dies: its `ray start --block` process group, then whatever the node started."""
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        self.nodes[name].wait(timeout=30)
        kill_marked(f"AR_TEST_NODE={self.marker}-{name}".encode())


class ClusterAgent(loop.Agent):
    """test_loop's agent; the cluster's commands run as program.md writes them (real uv, real Ray)."""

    def command(self, role, **values):
        if role in loop.CLUSTER_ROLES:
            return self.fill(role, **values)
        return super().command(role, **values)

    def job_id(self, i):
        out = self.do("cluster_id", i=str(i)).strip()
        assert re.fullmatch(r"raysubmit_\w+", out), out
        return out

    def wave(self, ideas, cluster, used=None, again=False, timeout=WAVE_TIMEOUT):
        """In the worktrees used (0, 1, ... by default): resets each and commits its idea (none: the tip as it
        is, a re-run), unless they run `again` as they are; submits them all with program.md's command and
        reads each run.log. Returns the runs, and the job states seen while it ran: [{submission id: (status,
        node id)}]."""
        used = used or [str(i) for i in range(len(ideas))]
        self.prepare_wave(ideas, used, again)
        before, seen, done = set(cluster.jobs()), [], threading.Event()

        def watch():
            while not done.is_set():
                jobs = cluster.jobs().items()
                seen.append({k: (j["status"], j["driver_node_id"]) for k, j in jobs if k not in before})
                time.sleep(0.3)

        watcher = threading.Thread(target=watch)
        watcher.start()
        command = self.command("cluster_run", candidates=" ".join(used))
        assert command.count("SECONDS + 1800") == command.count("sleep 10;") == 1, command
        try:
            self.sh(command.replace("SECONDS + 1800", f"SECONDS + {timeout}").replace("sleep 10;", "sleep 3;"))
        finally:
            done.set()
            watcher.join(timeout=30)
        runs = [self.read_result(idea[2] if idea else "re-run", self.head(f"../wave{i}"), where=f"../wave{i}",
                                 grep="wave_grep", tail=None) for i, idea in zip(used, ideas)]
        return runs, seen

    def log(self, run, status, i, description=None):
        """program.md's row command for the candidate of worktree i."""
        self.log_row(run, status, description, row="wave_row", i=str(i))

    def step1(self, cluster):
        """Loop step 1 between waves: the git state and the BEST command, until it gives numbers; each
        `RERUN` runs the tip again, unchanged, in a wave of worktree 0 alone, logged `discard` `re-run`.
        Returns the figures and the re-runs."""
        reruns = []
        for _ in range(5):
            self.look()
            figures = self.figures()  # checked against program.md's prose by test_loop's Agent
            if figures != "RERUN":
                return figures, reruns
            (run,), _ = self.wave([None], cluster)
            assert run.commit == self.head() and run.val_bpb is not None, run.log[-3000:]
            self.log(run, "discard", 0)
            reruns.append(run)
        raise AssertionError(f"the BEST command still asks for re-runs after {len(reruns)}")

    def judge(self, ideas, runs, figures, cluster):
        """Step 6 for a wave, as test_loop's waves decide it: the `again` line for every candidate (logged
        ` (slow)` and run again as it is in the next wave, where that run decides without the line), then
        the rest of the rule for the one with the lowest val_bpb; every other candidate a `discard`, or a
        `crash` by the rule. Logs every row (runs takes the runs that decided), then advances the branch to
        a kept winner. Returns the winner (None if every candidate crashed) and its status."""
        slow = [j for j, run in enumerate(runs) if loop.decide(run, figures) == "again"]
        for j in slow:
            self.log(runs[j], "discard", j, f"{runs[j].description} (slow)")
        if slow:
            rerun, _ = self.wave([ideas[j] for j in slow], cluster, used=[str(j) for j in slow], again=True)
            for j, run in zip(slow, rerun):
                assert run.commit == runs[j].commit
                runs[j] = run
        ran = [run for run in runs if run.val_bpb is not None]
        winner = min(ran, key=lambda run: run.val_bpb) if ran else None
        status = None
        if winner:
            numstat = self.do("wave_numstat", i=str(runs.index(winner)))
            status = loop.decide(winner, figures, numstat, again=False)
        for j, run in enumerate(runs):
            other = "discard" if run.val_bpb is not None else loop.decide(run, figures)
            self.log(run, status if run is winner else other, j)
        if status == "keep":
            self.do("merge", commit=winner.commit)
        return winner, status


@pytest.fixture(scope="module")
def night(tmp_path_factory, tiny_cache, pytestconfig):
    """The agent's scratch repository after setup (branch, results.tsv, three worktrees) and the
    cluster, started from it; both nodes are killed at the end, with every process they started."""
    loop.SCENARIOS.add("cluster")
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run pytest` names its own binary in UV
    assert uv, "the cluster tests need uv: the jobs run `uv run`"
    cache_dir = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip()
    repo = loop.make_repo(tmp_path_factory.mktemp("cluster"), tiny_cache, pytestconfig)
    agent = ClusterAgent(repo.cwd, repo.env, repo.program)
    loop.setup_steps(agent, TAG)
    for i in "012":
        agent.do("wave_worktree", i=i)

    scratch = Path(tempfile.mkdtemp(prefix="arc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    home = scratch / "home"
    (home / ".ray").mkdir(parents=True)
    token = os.urandom(32).hex()
    (home / ".ray" / "auth_token").write_text(token)  # Ray's default token file: nodes and agent read it there
    (home / ".ray" / "auth_token").chmod(0o600)
    env = {k: v for k, v in agent.env.items() if not k.startswith(("RAY_", "VIRTUAL_ENV", "UV_"))
           and k not in ("CUDA_VISIBLE_DEVICES", "PYTHONDONTWRITEBYTECODE")}  # Ray gives each job its GPU
    # RAY_memory_monitor_refresh_ms=0: other work shares this machine's memory, and Ray's OOM killer would pick our jobs
    env.update(HOME=str(home), UV_CACHE_DIR=cache_dir, RAY_AUTH_MODE="token", RAY_memory_monitor_refresh_ms="0",
               PATH=os.path.dirname(uv) + os.pathsep + env["PATH"])
    gcs, dashboard = free_port(), free_port()
    agent.env = dict(env, RAY_ADDRESS=f"http://127.0.0.1:{dashboard}")
    cluster = Cluster(agent.env["RAY_ADDRESS"], token, str(scratch), {})
    common = ["--block", "--num-cpus", "1", "--num-gpus", "1", "--object-store-memory", str(80 * 2**20),
              "--disable-usage-stats", "--dashboard-agent-listen-port"]  # two nodes on one machine: an agent port each
    starts = {"head": ["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                       str(dashboard), "--ray-client-server-port", str(free_port()),
                       "--temp-dir", str(scratch / "ray")],
              "worker": ["--address", f"127.0.0.1:{gcs}"]}

    def up():
        for name, p in cluster.nodes.items():
            assert p.poll() is None, f"the {name} node ended:\n" + (scratch / f"{name}.log").read_text()[-3000:]
        try:
            return len(cluster.alive_nodes()) == len(cluster.nodes)
        except requests.RequestException:  # the head's job server is not up yet
            return False

    try:
        for name, args in starts.items():
            node_env = dict(env, AR_TEST_CLUSTER=cluster.marker, AR_TEST_NODE=f"{cluster.marker}-{name}")
            with open(scratch / f"{name}.log", "w") as log:
                cluster.nodes[name] = subprocess.Popen(
                    [uv, "run", "--only-group", "cluster", "ray", "start", *args, *common, str(free_port())],
                    cwd=agent.cwd, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            cluster.wait(f"the {name} node", up, 120)
        yield agent, cluster
    finally:
        for p in cluster.nodes.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        kill_marked(f"AR_TEST_CLUSTER={cluster.marker}".encode())
        shutil.rmtree(scratch, ignore_errors=True)


def test_cluster_check_and_token(night):
    """The check counts the GPUs; without the token, or with a wrong one, the cluster refuses the
    check and the submission alike, and no job is made."""
    agent, cluster = night
    assert agent.do("cluster_check").strip() == "2 GPUs"
    assert requests.get(cluster.address + "/api/jobs/", timeout=10).status_code == 401
    jobs = cluster.jobs()
    no_mode = {k: v for k, v in agent.env.items() if k != "RAY_AUTH_MODE"}  # the client sends no token
    wrong = dict(agent.env, RAY_AUTH_TOKEN="0" * 64)  # the variable outranks the default file
    for env, refusal in ((no_mode, "Unauthorized"), (wrong, "Forbidden")):
        check = subprocess.run(["bash", "-c", agent.command("cluster_check")], cwd=agent.cwd, env=env,
                               capture_output=True, text=True, timeout=120)
        assert check.stdout.strip() == "0 GPUs" and refusal in check.stderr, check
        run = agent.command("cluster_run", candidates="0").replace("SECONDS + 1800", f"SECONDS + {WAVE_TIMEOUT}")
        subprocess.run(["bash", "-c", run], cwd=agent.cwd, env=env, timeout=180)
        log = (agent.cwd / "../wave0/run.log").read_text()
        assert refusal in log and "raysubmit_" not in log and "val_bpb" not in log, log[-3000:]
    assert cluster.jobs() == jobs
    assert cluster.token not in (agent.cwd / "../wave0/run.log").read_text()


@pytest.fixture(scope="module")
def waves(night):
    """The baseline wave (two worktrees, no edit, no commit), the re-runs the BEST command asks for,
    then a wave of three on two GPUs: a worse idea, a better one and one that crashes. Returns the
    baseline wave's runs, every later run, the job states seen while the wave of three ran, its runs
    and winner, and the token cache after the baseline wave and after all of them ({file: mtime})."""
    agent, cluster = night
    tokens = Path(agent.env["AUTORESEARCH_CACHE"]) / "tokens"

    def cached():
        return {p: p.stat().st_mtime_ns for p in tokens.rglob("*") if p.is_file()}

    (base, again), seen = agent.wave([None, None], cluster)
    after_first = cached()
    assert base.commit == again.commit == agent.head() and base.val_bpb is not None, base.log[-3000:]
    assert again.val_bpb is not None, again.log[-3000:]
    assert len({node for status, node in seen[-1].values()}) == 2, seen[-1]  # one on each node, at once
    agent.log(base, "keep", 0, "baseline")
    agent.log(again, "discard", 1)  # `re-run`
    figures, _ = agent.step1(cluster)

    ideas = [loop.WAVE_WORSE, loop.BETTER, NARROW]
    runs, seen = agent.wave(ideas, cluster)
    winner, _ = agent.judge(ideas, runs, figures, cluster)
    return [base, again], agent.runs[2:], seen, runs, winner, [after_first, cached()]


def test_wave_of_three_on_two_gpus(night, waves):
    """Two candidates ran at once on the two nodes while the third waited; every row holds the commit
    that ran, and the numbers of its run.log; the crash is a `crash` row, read through Ray's logs; the
    winner alone was judged by step 6's rule, a keep; the branch is at the winner."""
    agent, cluster = night
    first, _, seen, runs, winner, _ = waves
    running = [sum(status == "RUNNING" for status, _ in states.values()) for states in seen]
    assert max(running) == 2, seen
    queued = [states for states in seen if sorted(s for s, _ in states.values()) == ["PENDING", "RUNNING", "RUNNING"]]
    assert queued, seen
    assert len({node for status, node in queued[0].values() if status == "RUNNING"}) == 2

    assert [r.description for r in runs] == [loop.WAVE_WORSE[2], loop.BETTER[2], NARROW[2]]
    assert winner is runs[1], [(r.val_bpb, r.status) for r in runs]
    assert [r.status for r in runs] == ["discard", "keep", "crash"], [(r.val_bpb, r.status) for r in runs]
    loop.check_rows(agent)  # eight columns, each row against the run.log it came from, with its commit
    rows = loop.parse((agent.cwd / "results.tsv").read_text())
    assert {r["branch"] for r in rows} == {f"autoresearch/{TAG}"}
    assert [(r["status"], r["description"]) for r in rows[:2]] == [("keep", "baseline"), ("discard", "re-run")]
    assert {r["commit"] for r in rows if r["description"] in ("baseline", "re-run")} == {first[0].commit[:7]}
    # the re-runs the BEST command asked for, and runs step 6 sent `again`, aside:
    verdicts = [(r["status"], r["description"]) for r in rows
                if r["description"] != "re-run" and not r["description"].endswith(" (slow)")]
    assert verdicts == [("keep", "baseline"), ("discard", loop.WAVE_WORSE[2]), ("keep", loop.BETTER[2]),
                        ("crash", NARROW[2])]
    assert agent.sh(f"git log --format=%H autoresearch/{TAG}").split() == [winner.commit, first[0].commit]

    crash = runs[2]
    assert "val_bpb:" not in crash.grep_output and "Traceback" in crash.log, crash.log[-3000:]
    job = agent.job_id(2)
    assert cluster.jobs()[job]["status"] == "FAILED"
    assert "failed" in agent.do("cluster_status", id=job)
    logs = agent.do("cluster_logs", id=job)
    assert "Traceback" in logs and "RuntimeError" in logs and len(logs.splitlines()) <= 50, logs


def test_later_jobs_build_and_download_nothing(night, waves):
    """The first wave's jobs made the nodes' uv environment (in HOME, from uv's cache) and the token
    cache; no later job made either again: no uv install, no token file written."""
    agent, _ = night
    first, later, _, _, _, tokens = waves
    venv = re.escape(agent.env["HOME"] + "/.cache/autoresearch-venv")
    built = rf"^Creating virtual environment at: {venv}\n.*^Installed \d+ pack"
    assert any(re.search(built, run.log, re.M | re.S) for run in first), first[0].log[-3000:]
    assert tokens[0] and tokens[1] == tokens[0]
    assert len(later) >= 3
    for run in later:
        assert "ready: `uv run train.py` can run" in run.log, run.log[-3000:]  # prepare.py --check found the data
        assert not re.search(r"^(Creating virtual environment|Installed \d+ package)", run.log, re.M), run.log


def test_killed_worker_is_a_crash_and_the_next_wave_runs_on_the_head(night, waves):
    """Step 1 at the new tip (with the re-runs it asks for), then a wave of two slow candidates; the
    worker node is killed while one runs there: its job is FAILED within a minute and logged as a
    `crash`, the other finishes on the head and is judged (a discard). The next wave, on the head
    alone: its candidate hangs, outlives the wave's timeout, is logged as a `crash` and is stopped
    with program.md's command."""
    agent, cluster = night
    kept = waves[4]
    figures, _ = agent.step1(cluster)
    head = next(node for node, is_head in cluster.alive_nodes().items() if is_head)
    before, result = set(cluster.jobs()), {}
    wave = threading.Thread(target=lambda: result.update(out=agent.wave([SLOW, SLOW], cluster)))
    wave.start()

    def worker_jobs():
        return [k for k, j in cluster.jobs().items()
                if k not in before and j["status"] == "RUNNING" and j["driver_node_id"] != head]

    on_worker = cluster.wait("a slow job running on the worker", worker_jobs, 120)
    time.sleep(3)  # into the run: uv, prepare.py --check, train.py's imports, then its 20 s sleep
    assert cluster.jobs()[on_worker[0]]["status"] == "RUNNING"
    killed = time.time()
    cluster.kill("worker")
    cluster.wait("the worker's job FAILED", lambda: cluster.jobs()[on_worker[0]]["status"] == "FAILED", 60)
    failed_after = time.time() - killed
    wave.join(timeout=200)
    assert not wave.is_alive()
    runs, _ = result["out"]
    dead = [i for i in range(2) if agent.job_id(i) == on_worker[0]]
    assert len(dead) == 1 and failed_after < 60
    assert "node has died" in agent.do("cluster_status", id=on_worker[0])
    assert agent.do("cluster_check").strip() == "1 GPUs"
    survivor = runs[1 - dead[0]]
    assert runs[dead[0]].val_bpb is None and survivor.val_bpb is not None, survivor.log[-3000:]
    winner, status = agent.judge([SLOW, SLOW], runs, figures, cluster)  # a wave sent `again` runs on the head
    assert runs[dead[0]].status == "crash" and winner is runs[1 - dead[0]], runs
    assert status == "discard", (winner.val_bpb, figures)

    figures, _ = agent.step1(cluster)  # the tip is unchanged: numbers now, or re-runs on the head
    (hang,), _ = agent.wave([HANG], cluster, timeout="25")
    assert hang.val_bpb is None and hang.commit == agent.head("../wave0")
    job = agent.job_id(0)
    assert cluster.jobs()[job]["driver_node_id"] == head and "RUNNING" in agent.do("cluster_status", id=job)
    assert "Running entrypoint" in agent.do("cluster_logs", id=job)
    assert agent.judge([HANG], [hang], figures, cluster) == (None, None)  # logs it: a crash
    agent.do("cluster_stop", id=job)
    cluster.wait("the stopped job", lambda: cluster.jobs()[job]["status"] == "STOPPED", 30)
    assert "stopped" in agent.do("cluster_status", id=job)
    loop.check_rows(agent)
    rows = loop.parse((agent.cwd / "results.tsv").read_text())
    assert [(r["commit"], r["status"], r["description"]) for r in rows[-1:]] == [(hang.commit[:7], "crash", HANG[2])]
    assert agent.sh(f"git log -1 --format=%H autoresearch/{TAG}").strip() == kept.commit  # nothing kept since


def test_every_cluster_command_ran():
    """Last: the night above ran every cluster command of program.md."""
    if "cluster" not in loop.SCENARIOS:
        pytest.skip("the cluster night did not run in this session")
    assert loop.CLUSTER_ROLES - loop.RAN == set()
