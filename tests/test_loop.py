"""The loop test: play the agent of program.md to the letter, on CPU, against the real train.py.

A throw-away git repository is built from the project files; the commands are taken from
program.md's ```bash blocks (each found by a recognisable pattern, so the test fails when
program.md loses one) and run with bash inside that repository: branch, results.tsv header, the
baseline twice, a crash, a change that does not help, a change that does, with the keep /
discard / crash decisions made from the numbers the grep command pulls out of run.log.

Test knobs: AUTORESEARCH_CACHE (a tiny synthetic cache), AUTORESEARCH_TIME_BUDGET=2 and
AUTORESEARCH_EVAL_TOKENS=8192; and the small-machine line of train.py is shrunk further in the
setup commit. `uv run ` becomes this interpreter, so no new environment is built.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "program.md"
PROJECT_FILES = ["prepare.py", "train.py", "program.md", ".gitignore", "pyproject.toml", "uv.lock", "README.md", "analysis.ipynb"]

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"]
RUN_COMMAND = "timeout 600 uv run train.py > run.log 2>&1"
SMALL_LINE = "DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 4, 8, 2**13"
TINY_LINE = "DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 1, 1, 2**9"  # SEQ_LEN is 512 on CPU: 1 micro-step
# On this tiny setup (a couple of seconds of training) the lm_head learning rate decides val_bpb:
# measured on 2 CPU cores, 0.016 gives ~3.1, 0.0005 ~2.54 and 0.16 ~3.5-4.1, while two runs of the
# same code differ by up to ~0.08 (the step count depends on the machine's load). So the setup
# commit starts from a deliberately bad 0.016: lowering it is a sure keep, raising it a sure discard.
BAD_LR = ("UNEMBEDDING_LR = 0.004", "UNEMBEDDING_LR = 0.016")
WORSE_LR, WORSE_DESCRIPTION = "UNEMBEDDING_LR = 0.16", "raise UNEMBEDDING_LR 10x"
BETTER_LR, BETTER_DESCRIPTION = "UNEMBEDDING_LR = 0.0005", "lower UNEMBEDDING_LR to 0.0005"
TAG = "looptest"
ENV = {
    "AUTORESEARCH_TIME_BUDGET": "2",
    "AUTORESEARCH_EVAL_TOKENS": "8192",
    "CUDA_VISIBLE_DEVICES": "",  # CPU even on a GPU machine, so that the shrunk small-machine line applies
    "OMP_NUM_THREADS": "1",  # on a small shared machine one thread is faster than oversubscribed cores
}


# ---------------------------------------------------------------------------
# program.md's commands


def bash_commands(text):
    """Every command line of every ```bash block (blocks may sit indented inside list items)."""
    commands = []
    for m in re.finditer(r"^([ \t]*)```bash[ \t]*\n(.*?)^[ \t]*```", text, re.M | re.S):
        for line in m.group(2).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def find_command(commands, pattern, what):
    hits = [c for c in commands if re.search(pattern, c)]
    assert hits, f"program.md has no ```bash command for {what} (pattern {pattern!r})"
    return hits[0]


@dataclass
class Program:
    """The commands the agent runs, as program.md spells them."""
    branch: str
    header: str
    status: str
    commit: str
    run: str
    grep: str
    tail: str
    memory: str
    row: str
    reset: str
    history: str  # setup: every earlier run
    branches: str  # setup: earlier nights' branches
    old_log: str  # setup: an earlier branch's kept commits


def read_program():
    assert PROGRAM.exists(), "program.md is missing"
    commands = bash_commands(PROGRAM.read_text())
    assert commands, "program.md has no ```bash blocks"
    p = Program(
        branch=find_command(commands, r"^git checkout -b autoresearch/<tag>$", "creating the branch"),
        header=find_command(commands, r"commit\\tval_bpb\\tmemory_gb\\tstatus\\tdescription.*results\.tsv", "the results.tsv header"),
        status=find_command(commands, r"^git status\b", "looking at the git state"),
        commit=find_command(commands, r'^git commit -am "<short description>"$', "committing an idea"),
        run=find_command(commands, r"^(timeout \d+ )?uv run train\.py > run\.log 2>&1$", "the run"),
        grep=find_command(commands, r"^grep .*val_bpb.*peak_vram_mb.* run\.log$", "reading the result"),
        tail=find_command(commands, r"^tail -n 50 run\.log", "reading a crash"),
        memory=find_command(commands, r"peak_vram_mb.*run\.log.*1024", "memory_gb"),
        row=find_command(commands, r"^printf .*>> results\.tsv$", "appending a row to results.tsv"),
        reset=find_command(commands, r"^git reset --hard HEAD~1$", "going back after a discard or crash"),
        history=find_command(commands, r"^cat results\.tsv$", "reading all of results.tsv"),
        branches=find_command(commands, r"^git branch --list 'autoresearch/\*'$", "listing earlier branches"),
        old_log=find_command(commands, r"^git log --oneline autoresearch/<old-tag>$", "an earlier branch's kept commits"),
    )
    assert p.run == RUN_COMMAND, f"program.md's run command drifted: {p.run!r}"
    # a header command that could wipe an existing file is the memory-loss bug users reported
    assert p.header.startswith("[ -f results.tsv ] ||"), p.header
    for placeholder in ("VAL_BPB", "MEMORY_GB", "STATUS", '"DESCRIPTION"', "git rev-parse --short=7 HEAD"):
        assert placeholder in p.row, f"row command lacks {placeholder}: {p.row}"
    return p


def test_program_md_commands():
    """Cheap checks of program.md alone; the loop below runs the commands."""
    p = read_program()
    text = PROGRAM.read_text()
    commands = bash_commands(text)
    assert f"CUDA_VISIBLE_DEVICES=<N> {RUN_COMMAND}" in commands  # one agent per GPU, pinned
    assert "git worktree add ../autoresearch-gpu<N> -b autoresearch/<tag>-gpu<N>" in commands
    # the example results.tsv is tab-separated, with the exact header
    block = re.search(r"^```\n(commit\t.*?)^```", text, re.M | re.S)
    assert block, "program.md shows no example results.tsv"
    rows = block.group(1).splitlines()
    assert rows[0] == HEADER
    assert len(rows) >= 4 and all(len(r.split("\t")) == 5 for r in rows)
    assert any(r.endswith("\tbaseline repeat (noise)") for r in rows)
    assert "uv run prepare.py" in text and "~/.cache/autoresearch" in text
    assert 'if device.type != "cuda": DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = ...' in re.sub(r"\s+", " ", text)
    assert p.reset == "git reset --hard HEAD~1"


# ---------------------------------------------------------------------------
# The agent


@dataclass
class Run:
    description: str
    commit: str  # full hash of the commit that ran
    grep_output: str
    log: str  # run.log as it was right after the run
    val_text: str = ""  # val_bpb exactly as grep printed it
    val_bpb: float | None = None
    peak_vram_mb: float | None = None
    tail: str = ""
    status: str = ""


@dataclass
class Agent:
    repo: Path
    env: dict
    program: Program
    runs: list = field(default_factory=list)

    def sh(self, command, check=True):
        result = subprocess.run(["bash", "-c", command], cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=600)
        if check:
            assert result.returncode == 0, f"`{command}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def head(self):
        return self.sh("git rev-parse HEAD").strip()

    def look(self):
        """Loop step 1: the git state must be clean: run.log and results.tsv are ignored."""
        out = self.sh(self.program.status)
        assert not [line for line in out.splitlines() if re.match(r"[ MADRCU?!]{2} ", line)], out

    def edit(self, old, new):
        path = self.repo / "train.py"
        text = path.read_text()
        assert text.count(old) == 1, f"train.py no longer contains {old!r} exactly once"
        path.write_text(text.replace(old, new))

    def commit(self, description):
        self.sh(self.program.commit.replace("<short description>", description))

    def run(self, description):
        """Loop steps 3-5: run, grep, and on empty output read the tail."""
        command = self.program.run.replace("uv run ", shlex.quote(sys.executable) + " ", 1)
        self.sh(command, check=False)  # a crash exits non-zero; the grep decides
        with open(self.repo / "run.log", newline="") as f:  # as written, \r and all
            log = f.read()
        run = Run(description, self.head(), self.sh(self.program.grep, check=False), log)
        values = dict(line.split(":", 1) for line in run.grep_output.splitlines())
        if values:
            run.val_text = values["val_bpb"].strip()
            run.val_bpb, run.peak_vram_mb = float(run.val_text), float(values["peak_vram_mb"])
        else:
            run.tail = self.sh(self.program.tail)
        self.runs.append(run)
        return run

    def log_row(self, run, status):
        """Loop step 7, with the memory command of program.md."""
        run.status = status
        if run.val_bpb is None:
            val, mem = "0.000000", "0.0"
        else:
            val = run.val_text
            mem = self.sh(self.program.memory).strip()
        row = (self.program.row.replace("VAL_BPB", val).replace("MEMORY_GB", mem).replace("STATUS", status)
               .replace('"DESCRIPTION"', shlex.quote(run.description)))
        self.sh(row)

    def try_idea(self, old, new, description):
        """Loop steps 1-5 for one idea: look, edit train.py, commit, run and read the result."""
        self.look()
        self.edit(old, new)
        self.commit(description)
        return self.run(description)

    def reset(self):
        """Loop step 8 for a discard or crash: the git-ignored results.tsv and run.log survive it."""
        before = [(self.repo / name).read_bytes() for name in ("results.tsv", "run.log")]
        self.sh(self.program.reset)
        assert [(self.repo / name).read_bytes() for name in ("results.tsv", "run.log")] == before


def decide(val_bpb, best, noise, simpler=False):
    """program.md's rule: a real gain beats BEST by more than NOISE; a tie is kept only when simpler."""
    if val_bpb is None:
        return "crash"
    if val_bpb < best - noise:
        return "keep"
    if val_bpb <= best + noise:
        return "keep" if simpler else "discard"
    return "discard"


@dataclass
class Night:
    agent: Agent
    setup_commit: str
    kept_commit: str
    discarded_commits: list


@pytest.fixture(scope="module")
def night(tmp_path_factory, tiny_cache, pytestconfig):
    program = read_program()
    root = tmp_path_factory.mktemp("loop")
    # a private copy of the prepared cache: train.py writes its token caches there
    cache = root / "cache"
    for sub in ("data", "tokenizer"):
        shutil.copytree(tiny_cache / sub, cache / sub)
    repo = root / "repo"
    repo.mkdir()
    for name in PROJECT_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, repo / name)
    train = (repo / "train.py").read_text()
    for old, new in ((SMALL_LINE, TINY_LINE), BAD_LR):
        assert train.count(old) == 1, f"train.py no longer contains {old!r} exactly once"
        train = train.replace(old, new)
    (repo / "train.py").write_text(train)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "GIT_"))}
    env.update(ENV, AUTORESEARCH_CACHE=str(cache), GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    # torch's bytecode, compiled once and kept out of the venv: without it every run of train.py
    # spends seconds recompiling torch where PYTHONDONTWRITEBYTECODE is set
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    pycache = pytestconfig.cache.mkdir("loop-pycache") if pytestconfig.cache else root / "pycache"
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    agent = Agent(repo, env, program)
    agent.sh("git init -q && git config user.name 'Loop Test' && git config user.email loop@test.invalid"
             " && git config commit.gpgsign false && git add -A && git commit -q -m setup")
    setup_commit = agent.head()

    # --- setup
    agent.sh(program.branch.replace("<tag>", TAG))
    agent.sh(program.header)

    # --- the baseline, twice: the spread of the same code is NOISE
    base = agent.run("baseline")
    assert base.commit == setup_commit and base.val_bpb is not None, base.log[-3000:]
    agent.log_row(base, "keep")
    again = agent.run("baseline repeat (noise)")
    assert again.val_bpb is not None, again.log[-3000:]
    agent.log_row(again, "discard")
    best, noise = base.val_bpb, abs(base.val_bpb - again.val_bpb)
    discarded = []

    # --- an idea that crashes: the MLP's hidden layer made narrower, its output projection not
    narrow = ("self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd", "self.c_fc = nn.Linear(config.n_embd, 3 * config.n_embd")
    crash = agent.try_idea(*narrow, "narrower MLP (3x)")
    assert crash.grep_output == "" and crash.val_bpb is None
    assert "Traceback" in crash.tail and "RuntimeError" in crash.tail, crash.tail
    assert len(crash.tail.splitlines()) <= 50  # the end of the log, not a flood
    agent.log_row(crash, decide(crash.val_bpb, best, noise))
    discarded.append(crash.commit)
    agent.reset()
    assert agent.head() == base.commit

    # --- an idea that does not help
    worse = agent.try_idea(BAD_LR[1], WORSE_LR, WORSE_DESCRIPTION)
    assert worse.val_bpb is not None, worse.log[-3000:]
    status = decide(worse.val_bpb, best, noise)
    assert status == "discard" and worse.val_bpb > best + noise, (worse.val_bpb, best, noise)
    agent.log_row(worse, status)
    discarded.append(worse.commit)
    agent.reset()
    assert agent.head() == base.commit

    # --- an idea that helps
    better = agent.try_idea(BAD_LR[1], BETTER_LR, BETTER_DESCRIPTION)
    assert better.val_bpb is not None, better.log[-3000:]
    status = decide(better.val_bpb, best, noise)
    assert status == "keep" and better.val_bpb < best - noise, (better.val_bpb, best, noise)
    agent.log_row(better, status)
    agent.look()
    return Night(agent, setup_commit, better.commit, discarded)


# ---------------------------------------------------------------------------
# What the night left behind


def rows_of(repo):
    return (repo / "results.tsv").read_text().splitlines()


def test_branch_holds_only_setup_and_kept_commits(night):
    agent = night.agent
    assert agent.sh("git rev-parse --abbrev-ref HEAD").strip() == f"autoresearch/{TAG}"
    history = agent.sh("git log --format=%H").split()
    assert history == [night.kept_commit, night.setup_commit]
    for commit in night.discarded_commits:
        assert commit not in history
    assert agent.sh(f"git log -1 --format=%s {night.kept_commit}").strip() == BETTER_DESCRIPTION
    assert agent.sh("git status --porcelain").strip() == ""  # nothing left over from the resets


def test_results_tsv_holds_every_run_in_spec_format(night):
    agent = night.agent
    rows = rows_of(agent.repo)
    assert rows[0] == HEADER
    assert len(rows) == 1 + len(agent.runs) == 6
    for row, run in zip(rows[1:], agent.runs):
        commit, val_bpb, memory_gb, status, description = row.split("\t")  # exactly 5 columns
        assert re.fullmatch(r"[0-9a-f]{7}", commit) and run.commit.startswith(commit)
        assert re.fullmatch(r"\d+\.\d{6}", val_bpb) and re.fullmatch(r"\d+\.\d", memory_gb)
        assert status == run.status and status in ("keep", "discard", "crash")
        assert description == run.description and "\t" not in description
        if status == "crash":
            assert (val_bpb, memory_gb) == ("0.000000", "0.0")
        else:
            assert val_bpb == run.val_text
            assert memory_gb == f"{run.peak_vram_mb / 1024:.1f}"
    assert [r.split("\t")[3] for r in rows[1:]] == ["keep", "discard", "crash", "discard", "keep"]
    assert rows[1].split("\t")[0] == rows[2].split("\t")[0]  # the repeat ran the same commit


def test_results_tsv_untracked_and_never_overwritten(night):
    agent = night.agent
    assert agent.sh("git ls-files results.tsv run.log").strip() == ""
    assert agent.sh("git check-ignore results.tsv run.log").split() == ["results.tsv", "run.log"]
    before = rows_of(agent.repo)
    agent.sh(agent.program.header)  # the setup command again, as on a later night: appends nothing, wipes nothing
    assert rows_of(agent.repo) == before


def test_next_night_remembers_this_one(night):
    """The setup commands of a later night show every run and only the kept commits."""
    agent = night.agent
    assert agent.sh(agent.program.history) == (agent.repo / "results.tsv").read_text()
    assert f"autoresearch/{TAG}" in agent.sh(agent.program.branches).split()
    kept = [line.split()[0] for line in agent.sh(agent.program.old_log.replace("<old-tag>", TAG)).splitlines()]
    assert kept == [night.kept_commit[:len(kept[0])], night.setup_commit[:len(kept[0])]]


def test_grep_reads_real_run_logs(night):
    for run in night.agent.runs:
        summary = re.findall(r"^(\w+):\s+(\S+)$", run.log.split("\n---\n")[-1], re.M) if "\n---\n" in run.log else []
        if run.status == "crash":
            assert run.grep_output == "" and not summary
            continue
        values = dict(summary)
        assert run.grep_output.splitlines() == [
            f"val_bpb:          {values['val_bpb']}",
            f"peak_vram_mb:     {values['peak_vram_mb']}",
        ]
        assert run.val_bpb == float(values["val_bpb"]) > 0


def test_successful_logs_have_full_summary_block(night):
    for run in night.agent.runs:
        if run.status == "crash":
            continue
        tail = run.log.split("\n---\n")[-1].splitlines()
        assert [line[:18].rstrip().rstrip(":") for line in tail] == SUMMARY_KEYS, tail
        assert all(line[17] == " " and line[18] != " " for line in tail), tail  # keys padded to 18 columns
        assert re.fullmatch(r"\d+\.\d{6}", tail[0][18:])
        assert re.fullmatch(r"\d+", tail[6][18:]) and tail[8][18:] == "1"  # the shrunk depth
        header = run.log.split("\rstep ")[0]
        assert "\n---\n" not in header
        assert header.startswith("device: ") and "NOTE: NON-DEFAULT TIME_BUDGET=2s (AUTORESEARCH_TIME_BUDGET)" in header
