"""The loop test: play the agent of program.md to the letter, on CPU, against the real train.py.

Every command of program.md's ```bash blocks is given a role below (a command no role matches, or
a role no command matches, fails the test) and is run with bash in a throw-away git repository.
Two nights on one GPU: the first (setup, the baseline and the re-runs the BEST command asks for, a
crash, a slip fixed by amending, a change that helps); the second starts from the commit the human
has checked out, sees what the first kept, tries a change that does not help and one that does, and
runs on a busy machine: the baseline's re-run and the first run of the helpful change share one
core with three CPU-bound processes and make fewer steps, so the BEST command asks for another
re-run and step 6 for running the change again. Then
the README's morning commands and the notebook's summary of both nights, and both ways of using
several GPUs, with two concurrent runs from two worktrees on one shared cache each (the third
way, on a Ray cluster, is test_cluster.py's). Decisions come
from program.md's own rule block and BEST command, applied to the numbers its grep pulls out of
run.log; the last test checks that every command ran.

Test knobs: AUTORESEARCH_CACHE (a tiny synthetic cache), AUTORESEARCH_TIME_BUDGET=2 and
AUTORESEARCH_EVAL_TOKENS=8192; the small-machine line of train.py is shrunk further in the setup
commit. `uv run ` becomes this interpreter, so no new environment is built, and
`CUDA_VISIBLE_DEVICES=<gpu>` hides every GPU, so that the shrunk small-machine line applies.
"""

import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from test_analysis import counted, expected_kept, expected_nights, steps, value

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "program.md"
PROJECT_FILES = ["prepare.py", "train.py", "program.md", ".gitignore", "pyproject.toml", "uv.lock", ".python-version",
                 "README.md", "analysis.ipynb"]

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "num_steps", "mfu_percent", "branch"]
HEADER = "\t".join(COLUMNS)
SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"]
SMALL_LINE = "DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 4, 8, 2**13"
TINY_LINE = "DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 1, 1, 2**9"  # SEQ_LEN is 512 on CPU: 1 micro-step
# On this tiny setup (a couple of seconds of training, 4 to 18 steps as the machine's load allows)
# the lm_head learning rate decides val_bpb. Measured on 2 busy CPU cores: 0 (a uniform prediction)
# gives 2.96; 0.064 4.1-4.5; 0.016 2.9-3.1; 0.004 2.65-2.8; 0.16 3.3-5.8 and 0.32 3.4-5.5, while two
# runs of the same code differ by up to ~0.4 at 0.064 and ~0.1 below. So the setup commit starts
# from a deliberately bad 0.064: lowering it to 0.016 is a sure keep on the first night, lowering it
# again to 0.004 on the second; raising it is a sure discard.
BAD_LR = ("UNEMBEDDING_LR = 0.004", "UNEMBEDDING_LR = 0.064")
BETTER = (BAD_LR[1], "UNEMBEDDING_LR = 0.016", "lower UNEMBEDDING_LR to 0.016")
SLIP = (BAD_LR[1], "UNEMBEDDING_LR = 0.016)")  # a typo: train.py does not even parse
WORSE = (BETTER[1], "UNEMBEDDING_LR = 0.16", "raise UNEMBEDDING_LR 10x")  # the second night's
BETTER_AGAIN = (BETTER[1], "UNEMBEDDING_LR = 0.004", "lower UNEMBEDDING_LR to 0.004")
WAVE_WORSE = (BAD_LR[1], "UNEMBEDDING_LR = 0.32", "raise UNEMBEDDING_LR 5x")
TAG, TAG2 = "looptest", "looptest2"
ENV = {
    "AUTORESEARCH_TIME_BUDGET": "2",
    "AUTORESEARCH_EVAL_TOKENS": "8192",
    "CUDA_VISIBLE_DEVICES": "",  # CPU even on a GPU machine, so that the shrunk small-machine line applies
    "OMP_NUM_THREADS": "1",  # on a small shared machine one thread is faster than oversubscribed cores
}
HEADER_LINES = ("device:", "model:", "batch:", "NOTE:")
# Every command in program.md has exactly one of these roles (patterns match whole command lines).
ROW = r"""awk -F': \+' -v OFS='\\t' -v c="\$\(git {where}rev-parse --short=7 HEAD\)" -v b="\$\(git branch """ \
      r"""--show-current\)" -v s=STATUS -v d="DESCRIPTION" .* {log} >> results\.tsv"""
ROLES = {
    # setup
    "history": r"cat results\.tsv 2>/dev/null \|\| echo .*",
    "kept_before": r"\[ ! -f results\.tsv \] \|\| awk -F'\\t' .*gain .* results\.tsv results\.tsv",
    "branches": r"git branch -v --list 'autoresearch/\*'",
    "check": r"uv run prepare\.py --check",
    "env_check": r"env \| grep .*AUTORESEARCH_.* \|\| echo .*",
    "branch": r"git checkout -b autoresearch/<tag> \$\(git for-each-ref --sort=-committerdate --count=1 "
              r"--format='%\(refname:short\)' refs/heads/autoresearch/\)",
    "header": r"\[ -f results\.tsv \] \|\| printf '" + r"\\t".join(COLUMNS) + r"\\n' > results\.tsv",
    # the loop
    "status": r"git status --short.*",
    "best_noise": r"awk -F'\\t' -v b=\"\$\(git branch --show-current\)\" .*RERUN.*BEST=.*NOISE=.*STEPS=.* "
                  r"results\.tsv results\.tsv",
    "commit": r'git commit -am "<short description>"',
    "run": r"timeout 600 uv run train\.py > run\.log 2>&1",
    "grep": r"grep \S*device\S*val_bpb\S*num_steps\S*peak_vram_mb\S* run\.log",
    "tail": r"tail -n 50 run\.log",
    "amend": r"git commit -a --amend --no-edit",
    "numstat": r"git diff --numstat HEAD~1 -- train\.py",
    "row": ROW.format(where="", log=r"run\.log"),
    "reset": r"git reset --hard HEAD~1",
    # one agent per GPU
    "gpu_worktree": r"\[ -d \.\./autoresearch-gpu<N> \] \|\| git worktree add --detach \.\./autoresearch-gpu<N>",
    "gpu_branch": r'git -C \.\./autoresearch-gpu<N> checkout -b autoresearch/<tag>-gpu<N> "\$\(git rev-parse HEAD\)"',
    "gpu_cd": r"cd \.\./autoresearch-gpu<N>",
    "gpu_run": r"CUDA_VISIBLE_DEVICES=<N> timeout 600 uv run train\.py > run\.log 2>&1",
    "gpu_others": r"cat \.\./autoresearch-gpu\*/results\.tsv",
    # one agent, waves of candidates
    "wave_worktree": r"\[ -d \.\./wave<i> \] \|\| git worktree add --detach \.\./wave<i>",
    "wave_reset": r"git -C \.\./wave<i> reset --hard autoresearch/<tag>",
    "wave_commit": r'git -C \.\./wave<i> commit -am "<short description>"',
    "wave_run": r"for i in <gpus>; do \(cd \.\./wave\$i && CUDA_VISIBLE_DEVICES=\$i timeout 600 uv run train\.py "
                r"> run\.log 2>&1\) & done; wait",
    "wave_grep": r"grep \S*device\S*val_bpb\S*num_steps\S*peak_vram_mb\S* \.\./wave<i>/run\.log",
    "wave_row": ROW.format(where=r"-C \.\./wave<i> ", log=r"\.\./wave<i>/run\.log"),
    "wave_numstat": r"git -C \.\./wave<i> diff --numstat HEAD~1 -- train\.py",
    "merge": r"git merge --ff-only <commit>",
    # one agent, waves on a Ray cluster: played by test_cluster.py, in CI's cluster step
    "cluster_check": r"uv run --only-group cluster ray list nodes .* \| awk .*GPUs.*",
    "cluster_run": r"for i in <candidates>; do \(r=\"uv run --only-group cluster ray job\"; \$r submit --no-wait "
                   r"--working-dir \.\./wave\$i --entrypoint-num-gpus 1 -- sh -c '[^']*' > \.\./wave\$i/run\.log 2>&1 "
                   r"&& id=.* && end=\$\(\(SECONDS \+ \d+\)\) && until \$r status \$id .*; do sleep \d+; done; "
                   r"\[ -n \"\$id\" \] && \$r logs \$id >> \.\./wave\$i/run\.log 2>&1\) & done; wait",
    "cluster_id": r"grep -om1 'raysubmit_\S*' \.\./wave<i>/run\.log",
    "cluster_status": r"uv run --only-group cluster ray job status <id>",
    "cluster_logs": r"uv run --only-group cluster ray job logs <id> \| tail -n 50",
    "cluster_stop": r"uv run --only-group cluster ray job stop <id>",
}
CLUSTER_ROLES = {role for role in ROLES if role.startswith("cluster_")}
RAN = set()  # the roles whose command has run; the last test wants all of them
SCENARIOS = set()  # the scenarios below that started in this session


# ---------------------------------------------------------------------------
# program.md: its commands, its decision rule, its definitions of BEST, NOISE and STEPS


def bash_commands(text):
    """Every command line of every ```bash block (blocks may sit indented inside list items)."""
    commands = []
    for m in re.finditer(r"^([ \t]*)```bash[ \t]*\n(.*?)^[ \t]*```", text, re.M | re.S):
        for line in m.group(2).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def read_program():
    """{role: command} for program.md; fails on a command without a role or a role without a command."""
    assert PROGRAM.exists(), "program.md is missing"
    program = {}
    for command in bash_commands(PROGRAM.read_text()):
        roles = [role for role, pattern in ROLES.items() if re.fullmatch(pattern, command)]
        assert len(roles) == 1, f"program.md's command {command!r} matches the roles {roles}: it must match one"
        assert roles[0] not in program, f"program.md has two {roles[0]} commands: {program[roles[0]]!r}, {command!r}"
        program[roles[0]] = command
    missing = sorted(set(ROLES) - set(program))
    assert not missing, f"program.md has no ```bash command for {missing}"
    return program


def read_rule():
    """Step 6's decision rule, as program.md's ```text block writes it: [(outcome, condition)], the
    condition None for `otherwise`."""
    block = re.search(r"^[ \t]*```text[ \t]*\n(.*?)^[ \t]*```", PROGRAM.read_text(), re.M | re.S)
    assert block, "program.md has no ```text block with the decision rule"
    rules = []
    for line in block.group(1).splitlines():
        m = re.fullmatch(r"\s*(crash|again|keep|discard)\s+(?:if (.+?)|otherwise)\s*", line)
        assert m, f"a line of the decision rule the test cannot read: {line!r}"
        rules.append((m.group(1), m.group(2)))
    return rules


@dataclass
class Figures:
    best: float
    noise: float
    steps: int


def decide(run, figures, numstat=None, again=True, slower=False):
    """Apply program.md's rule to a run: the first line that holds wins. ADDED and REMOVED are the
    numbers `git diff --numstat` printed; `again=False` leaves that line out (a commit's second
    run), `slower` is the agent's word that the change makes a step slower."""
    added, removed = (int(x) for x in numstat.split()[:2]) if numstat else (0, 0)
    names = {"val_bpb": run.val_bpb, "NUM_STEPS": run.num_steps, "BEST": figures.best, "NOISE": figures.noise,
             "STEPS": figures.steps, "ADDED": added, "REMOVED": removed}
    for outcome, condition in read_rule():
        if condition is None:
            return outcome
        if "no val_bpb" in condition:
            if run.val_bpb is None:
                return outcome
            continue
        condition, _, unless = condition.partition(", unless ")
        if (outcome == "again" and not again) or (unless and slower):
            continue
        if run.val_bpb is not None and eval(condition, {"__builtins__": {}}, names):
            return outcome
    raise AssertionError("program.md's decision rule has no `otherwise` line")


def prose():
    return re.sub(r"\s+", " ", PROGRAM.read_text())


def noise_floor():
    m = re.search(r"`NOISE` the standard deviation .*?at least ([0-9]+(?:\.[0-9]+)?)", prose())
    assert m, "program.md does not say NOISE's floor (`NOISE` the standard deviation ... at least <number>)"
    return float(m.group(1))


def parse(text):
    """results.tsv's rows as dicts (a five-column header reads eight-field rows by position)."""
    lines = text.splitlines()
    return [dict(zip(COLUMNS, line.split("\t"))) for line in lines[1:]]


def expected_figures(rows, branch):
    """program.md's BEST, NOISE and STEPS from its prose, for the rows of one branch: a Figures,
    'RERUN' or 'no baseline'."""
    tonight = [r for r in rows if r.get("branch") == branch]
    keeps = [i for i, r in enumerate(tonight) if r["status"] == "keep"]
    if not keeps:
        return "no baseline"
    tip = tonight[keeps[-1]]["commit"]
    groups = {}
    for i in counted(tonight):
        groups.setdefault(tonight[i]["commit"], []).append(tonight[i])
    pairs = [[value(r) for r in g] for g in groups.values() if len(g) > 1]
    df = sum(len(g) - 1 for g in pairs)
    noise = math.sqrt(sum(sum((x - statistics.mean(g)) ** 2 for x in g) for g in pairs) / df) if df else 0.0
    noise = max(noise, noise_floor())
    best = statistics.mean(value(r) for r in groups[tip])
    since = len(tonight) - 1 - max(i for i, r in enumerate(tonight) if r["commit"] == tip)
    tip_runs = sum(r["commit"] == tip and r["status"] != "crash" for r in tonight)
    if (not df or noise > best / 100) and tip_runs < 4 or since >= RERUN_AFTER:
        return "RERUN"
    return Figures(best, noise, round(statistics.mean(steps(r) for r in groups[tip])))


def test_program_md_commands():
    """Cheap checks of program.md alone; the fixtures below run the commands."""
    program = read_program()
    text = PROGRAM.read_text()
    assert [status for status, _ in read_rule()][-1:] == ["discard"]
    # the example results.tsv is tab-separated, with the exact header: the original five columns first
    block = re.search(r"^```\n(commit\t.*?)^```", text, re.M | re.S)
    assert block, "program.md shows no example results.tsv"
    rows = block.group(1).splitlines()
    assert rows[0] == HEADER and COLUMNS[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert len(rows) >= 4 and all(len(r.split("\t")) == len(COLUMNS) for r in rows)
    assert any("\tre-run\t" in r for r in rows) and any("(slow)\t" in r for r in rows)
    assert any(r.split("\t")[3] == "crash" and r.split("\t")[5:7] == ["-", "-"] for r in rows)
    assert 'if device.type != "cuda": DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = ...' in prose()
    # setup reads the history before it creates tonight's branch
    assert text.index(program["history"]) < text.index(program["kept_before"]) < text.index(program["branch"])
    assert program["gpu_run"].startswith("CUDA_VISIBLE_DEVICES=<N> ")
    assert "CUDA_VISIBLE_DEVICES=$i " in program["wave_run"]
    # a moved cache is legitimate: only the variables that change results are forbidden
    assert "AUTORESEARCH_CACHE" not in program["env_check"] and "~/.cache/autoresearch" in text
    # one figure for a run's length; the rule's reason names the simulation that chose it
    assert len(set(re.findall(r"(\d+(?:\.\d+)? to \d+) minutes", prose()))) == 1
    assert "benchmarks/keep_rules.py" in prose() and (ROOT / "benchmarks" / "keep_rules.py").exists()


def row(commit, val, status, description, steps="16", branch="autoresearch/b", mfu="n/a"):
    return dict(commit=commit, val_bpb=val, memory_gb="44.0" if status != "crash" else "0.0", status=status,
                description=description, num_steps=steps if status != "crash" else "-",
                mfu_percent=mfu if status != "crash" else "-", branch=branch)


def table(rows, columns=COLUMNS):
    return "".join(line + "\n" for line in ["\t".join(columns)] + ["\t".join(r[c] for c in columns) for r in rows])


EARLIER = [row("a000001", "1.000000", "keep", "baseline", branch="autoresearch/a"),
           row("a000001", "1.000100", "discard", "re-run", branch="autoresearch/a"),
           row("a000002", "0.990000", "keep", "an earlier night's gain", branch="autoresearch/a")]
BASE = [row("b000001", "0.995000", "keep", "baseline"), row("b000001", "0.997000", "discard", "re-run")]
# program.md re-measures the tip after this many runs without a keep (benchmarks/keep_rules.py chose it)
RERUN_AFTER = int(re.search(r"after (\d+) runs without a keep", PROGRAM.read_text()).group(1))
IDEAS = [row(f"b0001{i:02d}", f"0.99{6 + i % 3}000", "discard", f"idea {i}") for i in range(RERUN_AFTER)]
# (rows of the file, what the command must do with them); the figures themselves come from expected_figures
BEST_CASES = {
    "no run tonight yet": (EARLIER, "no baseline"),
    "the baseline alone: no pair for NOISE": (EARLIER + BASE[:1], "RERUN"),
    "the baseline and its re-run; an earlier night ignored": (EARLIER + BASE, Figures),
    "the re-run on a busy machine counts in none": (BASE[:1] + [row("b000001", "0.990000", "discard", "re-run", "8")],
                                                   "RERUN"),
    "a third run at full speed makes the pair": (BASE[:1] + [row("b000001", "0.990000", "discard", "re-run", "8"),
                                                             row("b000001", "0.996000", "discard", "re-run")], Figures),
    "NOISE above 1% of BEST from two runs": ([BASE[0], row("b000001", "1.040000", "discard", "re-run")], "RERUN"),
    "... accepted from four": ([BASE[0]] + [row("b000001", v, "discard", "re-run") for v in ("1.04", "0.96", "1.03")],
                               Figures),
    "a machine slowed for good: no pair, but four runs stand": (
        [BASE[0]] + [row("b000001", v, "discard", "re-run", "9") for v in ("1.04", "1.05", "1.03")], Figures),
    "a gain, a crash, a discard: BEST is the new tip's run": (
        BASE + [row("b000002", "0.990000", "keep", "a gain"), row("b000003", "0", "crash", "a crash"),
                row("b000004", "0.980000", "discard", "lower, but discarded")], Figures),
    "a shorter train.py kept within the noise: BEST rises": (BASE + [row("b000002", "0.996500", "keep", "shorter")],
                                                             Figures),
    "one run short of RERUN_AFTER without a keep": (BASE + IDEAS[:-1], Figures),
    "RERUN_AFTER runs without a keep: re-measure the tip": (BASE + IDEAS, "RERUN"),
    "the tip re-run after them": (BASE + IDEAS + [row("b000001", "0.994000", "discard", "re-run")], Figures),
}


@pytest.mark.parametrize("case", list(BEST_CASES))
def test_best_noise_command_follows_its_definition(tmp_path, case):
    """program.md's BEST command against its own prose (expected_figures), on files that reach
    each of its outcomes."""
    rows, outcome = BEST_CASES[case]
    (tmp_path / "results.tsv").write_text(table(rows))
    agent = Agent(tmp_path, dict(os.environ), read_program())
    agent.sh("git init -q -b autoresearch/b")
    expected = expected_figures(rows, "autoresearch/b")
    assert expected == outcome or (outcome is Figures and isinstance(expected, Figures)), expected  # the case's intent
    got = agent.figures()
    if isinstance(expected, Figures):
        assert isinstance(got, Figures), got
        assert abs(got.best - expected.best) < 2e-6 and abs(got.noise - expected.noise) < 2e-6, (got, expected)
        assert got.steps == expected.steps
    else:
        assert got == expected


def test_kept_before_command_lists_every_nights_gains(tmp_path):
    """Step 3's second command on a file begun in the original five-column format (two nights,
    told apart by their `baseline` rows) and continued in the new one (two branches, slow runs, one
    of them the baseline's, re-runs that move BEST): every kept change with its gain, no baseline."""
    old = [row("c000001", "1.000000", "keep", "baseline"), row("c000001", "1.001000", "discard", "baseline repeat"),
           row("c000002", "0.995000", "keep", "lr up"), row("c000003", "0", "crash", "wide"),
           row("d000001", "0.996000", "keep", "baseline"), row("d000002", "0.990000", "keep", "better")]
    new = [row("e000001", "0.990000", "keep", "baseline", branch="autoresearch/x"),
           row("e000001", "1.200000", "discard", "re-run", "7", branch="autoresearch/x"),
           row("e000001", "0.992000", "discard", "re-run", branch="autoresearch/x"),
           row("e000002", "0.985000", "keep", "a gain", branch="autoresearch/x"),
           row("e000002", "0.987000", "discard", "re-run", branch="autoresearch/x"),
           row("e000003", "0.984000", "keep", "a second gain", branch="autoresearch/x"),
           row("f000001", "0.984000", "keep", "baseline", "8", branch="autoresearch/y"),  # slow: counts nowhere
           row("f000001", "0.990000", "discard", "re-run", branch="autoresearch/y"),
           row("f000001", "0.992000", "discard", "re-run", branch="autoresearch/y"),
           row("f000002", "0.980000", "keep", "a gain on a slow baseline", branch="autoresearch/y")]
    for r in old:
        r.update(num_steps="", mfu_percent="", branch="")
    (tmp_path / "results.tsv").write_text(table(old, COLUMNS[:5]) + table(new).split("\n", 1)[1])
    agent = Agent(tmp_path, dict(os.environ), read_program())
    lines = [line.split("\t") for line in agent.do("kept_before").splitlines()]
    kept = expected_kept(parse(table(old + new)))
    assert [k[1] for k in kept] == ["c000002", "d000002", "e000002", "e000003", "f000002"]  # no baseline
    assert len(lines) == len(kept)
    for line, (night, commit, val, gain, description) in zip(lines, kept):
        assert line[:3] == [night, commit, val] and line[4] == description
        assert line[3].startswith("gain ") and abs(float(line[3][5:]) - gain) < 1e-6, (line, gain)
    (tmp_path / "results.tsv").unlink()
    assert agent.do("kept_before") == ""  # the first night: no file, no error


def test_row_command_reads_a_gpu_summary_and_a_crash(tmp_path):
    """Step 7's row from a GPU run's summary (mfu a number) and from a crashed run's log (no summary):
    the crash's numbers are `0.000000`, `0.0` and `-`."""
    agent = Agent(tmp_path, dict(os.environ), read_program())
    agent.sh("git init -q -b autoresearch/g && git -c user.name=t -c user.email=t@t commit -q --allow-empty -m x")
    summary = {"val_bpb": "0.997900", "peak_vram_mb": "45060.2", "mfu_percent": "39.80", "num_steps": "953"}
    log = "device: NVIDIA H100 | mlp: fused\nNOTE: something\nstep 00000 (0.0%) | loss 9.0\n---\n" + "".join(
        f"{key + ':':<18}{summary.get(key, '1.0')}\n" for key in SUMMARY_KEYS)
    crash = "device: NVIDIA H100\nstep 00000 (0.0%) | loss 9.0\nTraceback (most recent call last):\nRuntimeError: x\n"
    commit = agent.head()[:7]
    for text, status in ((log, "keep"), (crash, "crash")):
        (tmp_path / "run.log").write_text(text)
        agent.sh(agent.command("row").replace("STATUS", status).replace('"DESCRIPTION"', "'a b: c'"))
    lines = (tmp_path / "results.tsv").read_text().splitlines()
    gpu, crashed = [dict(zip(COLUMNS, line.split("\t"))) for line in lines]
    assert list(gpu.values()) == [commit, "0.997900", f"{45060.2 / 1024:.1f}", "keep", "a b: c", "953", "39.80",
                                  "autoresearch/g"]
    assert list(crashed.values()) == [commit, "0.000000", "0.0", "crash", "a b: c", "-", "-", "autoresearch/g"]


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
    num_steps: int | None = None
    peak_vram_mb: float | None = None
    tail: str = ""
    status: str = ""
    branch: str = ""  # the branch its row names


def hide_gpus(command):
    return re.sub(r"CUDA_VISIBLE_DEVICES=\S+ ", "CUDA_VISIBLE_DEVICES= ", command)


def summary(log):
    """The summary block of a run.log as {key: value}; {} after a crash."""
    return dict(re.findall(r"^(\w+):\s+(\S+)$", log.split("\n---\n")[-1], re.M)) if "\n---\n" in log else {}


@dataclass
class Agent:
    cwd: Path
    env: dict
    program: dict
    runs: list = field(default_factory=list)  # every run logged, in the order of results.tsv

    def fill(self, role, **values):
        """program.md's command for a role, placeholders filled in."""
        text = self.program[role]
        for placeholder, filling in values.items():
            text = text.replace(f"<{placeholder}>", filling)
        assert not re.search(r"<[a-z][a-z -]*>", text), f"a placeholder left in {text!r}"
        RAN.add(role)
        return text

    def command(self, role, **values):
        """The command, ready for bash here: this interpreter for `uv run`, no GPU."""
        return hide_gpus(self.fill(role, **values)).replace("uv run ", shlex.quote(sys.executable) + " ")

    def sh(self, command, check=True, busy=False):
        """Run a command in bash here; busy: on a busy machine, one core shared with three CPU-bound
        processes (where the system lets a process choose its cores)."""
        pin = None
        if busy and hasattr(os, "sched_setaffinity"):
            pin = lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # noqa: E731
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin) for _ in range(3 * busy)]
        try:
            result = subprocess.run(["bash", "-c", command], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                                    timeout=600, preexec_fn=pin)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        if check:
            assert result.returncode == 0, f"`{command}` failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        return result.stdout

    def do(self, role, check=True, busy=False, **values):
        return self.sh(self.command(role, **values), check, busy)

    def head(self, where="."):
        return self.sh(f"git -C {where} rev-parse HEAD").strip()

    def branch(self):
        return self.sh("git branch --show-current").strip()

    def cd(self, role, **values):
        """A `cd` of program.md moves the agent's shell."""
        target = self.command(role, **values).removeprefix("cd ")
        self.cwd = (self.cwd / target).resolve()
        assert self.cwd.is_dir(), self.cwd

    def look(self):
        """Loop step 1: the git state must be clean: run.log and results.tsv are ignored."""
        out = self.do("status")
        assert not [line for line in out.splitlines() if re.match(r"[ MADRCU?!]{2} ", line)], out

    def edit(self, old, new, where="."):
        path = self.cwd / where / "train.py"
        text = path.read_text()
        assert text.count(old) == 1, f"train.py no longer contains {old!r} exactly once"
        path.write_text(text.replace(old, new))

    def prepare_wave(self, ideas, used, again=False):
        """A wave's worktrees as program.md sets them: each reset to the branch's tip and its idea
        committed (none: the tip as it is, a re-run), unless they run `again` as they are."""
        for i, idea in zip(used, ideas):
            if not again:
                self.do("wave_reset", i=i, tag=TAG)
            if idea and not again:
                self.edit(idea[0], idea[1], where=f"../wave{i}")
                self.do("wave_commit", i=i, **{"short description": idea[2]})

    def read_result(self, description, commit, where="", grep="grep", tail="tail"):
        """Loop steps 4-5: grep run.log (its header, checked after every run, and the result), and
        on no val_bpb read the tail."""
        with open(self.cwd / where / "run.log", newline="") as f:  # as written, \r and all
            log = f.read()
        run = Run(description, commit, self.do(grep, check=False, i=where.removeprefix("../wave")), log)
        lines = run.grep_output.splitlines()
        header = [line for line in log.split("\nstep ")[0].splitlines() if line.startswith(HEADER_LINES)]
        assert [line for line in lines if line.startswith(HEADER_LINES)] == header
        assert not header or header[0].startswith("device: ")  # a slip fails before the header
        values = {k: v.strip() for k, v in (line.split(":", 1) for line in lines if not line.startswith(HEADER_LINES))}
        if values:
            run.val_text = values["val_bpb"]
            run.val_bpb, run.peak_vram_mb = float(run.val_text), float(values["peak_vram_mb"])
            run.num_steps = int(values["num_steps"])
        elif tail:
            run.tail = self.do(tail)
        return run

    def run(self, description, busy=False):
        """Loop steps 3-5 in this checkout."""
        self.do("run", check=False, busy=busy)  # a crash exits non-zero; the grep decides
        return self.read_result(description, self.head())

    def figures(self):
        """BEST, NOISE and STEPS from program.md's command: a Figures, 'RERUN' or 'no baseline',
        each time checked against program.md's prose applied to the rows (expected_figures)."""
        out = self.do("best_noise").strip()
        expected = expected_figures(parse((self.cwd / "results.tsv").read_text()), self.branch())
        if out.startswith(("RERUN", "no baseline")):
            assert out.startswith(expected), (out, expected)
            return expected
        m = re.fullmatch(r"BEST=(\d+\.\d{6}) NOISE=(\d+\.\d{6}) STEPS=(\d+)", out)
        assert m and isinstance(expected, Figures), (out, expected)
        got = Figures(float(m.group(1)), float(m.group(2)), int(m.group(3)))
        assert abs(got.best - expected.best) < 2e-6 and abs(got.noise - expected.noise) < 2e-6, (got, expected)
        assert got.steps == expected.steps, (got, expected)
        return got

    def step1(self, busy_reruns=0):
        """Loop step 1: the git state, then the BEST command until it gives numbers: each RERUN runs
        the tip again, the first `busy_reruns` of them on a busy machine. Returns (figures, the
        command's answers in order)."""
        answers = []
        for attempt in range(5):
            self.look()
            answers.append(self.figures())
            if answers[-1] != "RERUN":
                return answers[-1], answers
            run = self.run("re-run", busy=attempt < busy_reruns)
            keeps = [r for r in parse((self.cwd / "results.tsv").read_text())
                     if r["branch"] == self.branch() and r["status"] == "keep"]
            assert run.val_bpb is not None and run.commit.startswith(keeps[-1]["commit"]), run.log[-3000:]
            self.log_row(run, "discard")
        raise AssertionError(f"the BEST command still asks for re-runs: {answers}")

    def log_row(self, run, status, description=None, row="row", **values):
        """Loop step 7: program.md's row command, STATUS and DESCRIPTION filled in."""
        run.status, run.description, run.branch = status, description or run.description, self.branch()
        command = self.command(row, **values).replace("STATUS", status)
        self.sh(command.replace('"DESCRIPTION"', shlex.quote(run.description)))
        self.runs.append(run)

    def try_idea(self, old, new, description, busy=False):
        """Loop steps 1-5 for one idea (step 1's figures already in hand): edit, commit, run, read."""
        self.look()
        self.edit(old, new)
        self.do("commit", **{"short description": description})
        return self.run(description, busy)

    def judge(self, run, figures, slower=False):
        """Loop steps 6-7, and the second run that `again` asks for; returns the run that decided."""
        numstat = self.do("numstat") if run.val_bpb is not None else None
        status = decide(run, figures, numstat, slower=slower)
        if status == "again":
            description = run.description
            self.log_row(run, "discard", f"{description} (slow)")
            run = self.run(description)
            status = decide(run, figures, numstat, again=False, slower=slower)
        self.log_row(run, status)
        return run

    def reset(self):
        """Loop step 8 for a discard or crash: the git-ignored results.tsv and run.log survive it."""
        before = [(self.cwd / name).read_bytes() for name in ("results.tsv", "run.log")]
        self.do("reset")
        assert [(self.cwd / name).read_bytes() for name in ("results.tsv", "run.log")] == before


def make_repo(root, tiny_cache, pytestconfig):
    """A git repository of the project on branch main (train.py shrunk, its lm_head learning rate
    bad), an empty copy of the prepared cache, and the environment the agent's shell sees."""
    cache = root / "cache"  # train.py writes its token caches here
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
    agent = Agent(repo, env, read_program())
    agent.sh("git init -q -b main && git config user.name 'Loop Test' && git config user.email loop@test.invalid"
             " && git config commit.gpgsign false && git add -A && git commit -q -m setup")
    return agent


def setup_steps(agent, tag=None):
    """Setup steps 3-4 of a first night, the history before any branch exists and the machine
    check; with a tag, steps 5-6 as well: tonight's branch and results.tsv."""
    assert not (agent.cwd / "results.tsv").exists() and "no results.tsv yet" in agent.do("history")
    assert agent.do("kept_before") == "" and agent.do("branches").strip() == ""
    out = agent.do("check")
    assert agent.env["AUTORESEARCH_CACHE"] in out, out
    # the test's own budget knobs are what the check must catch; a moved cache is not
    assert agent.do("env_check").split() == ["AUTORESEARCH_EVAL_TOKENS=8192", "AUTORESEARCH_TIME_BUDGET=2"]
    clean = {k: v for k, v in agent.env.items() if k not in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS")}
    out = subprocess.run(["bash", "-c", agent.command("env_check")], env=clean, capture_output=True, text=True).stdout
    assert out.startswith("ok") and "AUTORESEARCH_CACHE" in clean, out
    if tag:
        start = agent.head()
        agent.do("branch", tag=tag)
        assert agent.branch() == f"autoresearch/{tag}" and agent.head() == start  # the first night: where it stands
        agent.do("header")
        assert (agent.cwd / "results.tsv").read_text() == HEADER + "\n"


# ---------------------------------------------------------------------------
# Two nights on one GPU, the second on a busy machine


@dataclass
class Night:
    agent: Agent
    start: str  # the commit the night started from
    kept: str  # the commit it kept
    answers: list  # the BEST command's answers, in order
    discarded: list = field(default_factory=list)
    slip: str = ""
    setup: dict = field(default_factory=dict)  # {role: output} of its setup commands
    first_rows: int = 0  # the rows of results.tsv before it


@pytest.fixture(scope="module")
def night(tmp_path_factory, tiny_cache, pytestconfig):
    """The first night: runs train.py seven to eight times (the slip fails at once): 40-60 s on 2
    cores, paid by the first test that uses it; the second night goes on in the same repository."""
    SCENARIOS.add("night")
    agent = make_repo(tmp_path_factory.mktemp("night"), tiny_cache, pytestconfig)
    start = agent.head()
    setup_steps(agent, TAG)

    # --- the baseline; the BEST command then asks for a re-run: NOISE needs a pair
    base = agent.run("baseline")
    assert base.commit == start and base.val_bpb is not None, base.log[-3000:]
    assert "NOTE: NON-DEFAULT TIME_BUDGET=2s (AUTORESEARCH_TIME_BUDGET)" in base.log
    agent.log_row(base, "keep")
    figures, answers = agent.step1()
    assert answers[0] == "RERUN" and agent.runs[1].description == "re-run" and agent.runs[1].commit == start

    # --- an idea that crashes: the MLP's hidden layer made narrower, its output projection not
    narrow = ("self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd",
              "self.c_fc = nn.Linear(config.n_embd, 3 * config.n_embd")
    crash = agent.try_idea(*narrow, "narrower MLP (3x)")
    assert "val_bpb:" not in crash.grep_output and crash.val_bpb is None
    assert "Traceback" in crash.tail and "RuntimeError" in crash.tail, crash.tail
    assert len(crash.tail.splitlines()) <= 50  # the end of the log, not a flood
    assert agent.judge(crash, figures).status == "crash"
    discarded = [crash.commit]
    agent.reset()
    assert agent.head() == start

    # --- an idea that helps, typed with a slip first: the run fails at once, the fix is amended
    figures, more = agent.step1()
    answers += more
    slip = agent.try_idea(*SLIP, BETTER[2])
    assert slip.val_bpb is None and "SyntaxError" in slip.tail, slip.tail
    agent.edit(SLIP[1], BETTER[1])
    agent.do("amend")
    better = agent.run(BETTER[2])
    assert better.commit != slip.commit and better.val_bpb is not None, better.log[-3000:]
    assert re.fullmatch(r"1\t1\ttrain\.py\n", agent.do("numstat"))  # one line changed
    better = agent.judge(better, figures)
    assert better.status == "keep" and better.val_bpb < figures.best, (better.val_bpb, figures)
    agent.look()
    return Night(agent, start, better.commit, answers, discarded, slip.commit)


@pytest.fixture(scope="module")
def second_night(night):
    """The second night, in the first one's repository, from the commit the human has checked out
    (main): the baseline's re-run and the idea's first run on a busy machine. 30-45 s on 2 cores."""
    SCENARIOS.add("second night")
    agent = night.agent
    first_rows = len(agent.runs)
    agent.sh("git checkout -q main")
    setup = {role: agent.do(role) for role in ("history", "kept_before", "branches")}
    agent.do("branch", tag=TAG2)
    start = agent.head()
    agent.do("header")  # the file exists: nothing happens

    base = agent.run("baseline")
    agent.log_row(base, "keep")
    figures, answers = agent.step1(busy_reruns=1)
    busy = agent.runs[first_rows + 1]
    assert busy.num_steps < 0.9 * statistics.mean([base.num_steps, busy.num_steps]), (base.num_steps, busy.num_steps)
    assert answers[:2] == ["RERUN", "RERUN"], answers  # the busy re-run counts in none: still no pair

    worse = agent.judge(agent.try_idea(*WORSE), figures)
    assert worse.status == "discard" and worse.val_bpb > figures.best, (worse.val_bpb, figures)
    agent.reset()
    assert agent.head() == start

    figures, more = agent.step1()
    answers += more
    first = agent.try_idea(*BETTER_AGAIN, busy=True)
    assert first.num_steps < 0.9 * figures.steps, (first.num_steps, figures)
    better = agent.judge(first, figures)
    assert agent.runs[-2] is first and first.description == f"{BETTER_AGAIN[2]} (slow)" and first.status == "discard"
    assert better.commit == first.commit and better.status == "keep", (better.val_bpb, figures)
    agent.look()
    return Night(agent, start, better.commit, answers, [worse.commit], setup=setup, first_rows=first_rows)


def rows_of(repo):
    return (repo / "results.tsv").read_text().splitlines()


def test_branch_holds_only_setup_and_kept_commits(night):
    agent = night.agent
    history = agent.sh(f"git log --format=%H autoresearch/{TAG}").split()
    assert history == [night.kept, night.start]
    for commit in night.discarded + [night.slip]:
        assert commit not in history
    assert agent.sh(f"git log -1 --format=%s {night.kept}").strip() == BETTER[2]
    assert agent.sh("git status --porcelain").strip() == ""  # nothing left over from the resets


def check_rows(agent):
    """Every row of the agent's results.tsv against the run.log it came from: the five original
    columns, then num_steps, mfu_percent (n/a without CUDA: not a crash's `-`) and the branch."""
    rows = rows_of(agent.cwd)
    assert rows[0] == HEADER and len(rows) == 1 + len(agent.runs)
    for line, run in zip(rows[1:], agent.runs):
        commit, val_bpb, memory_gb, status, description, num_steps, mfu, branch = line.split("\t")  # 8 columns
        assert re.fullmatch(r"[0-9a-f]{7}", commit) and run.commit.startswith(commit)
        assert (status, description, branch) == (run.status, run.description, run.branch) and "\t" not in description
        values = summary(run.log)
        if status == "crash":
            assert (val_bpb, memory_gb, num_steps, mfu) == ("0.000000", "0.0", "-", "-") and not values
        else:
            assert val_bpb == run.val_text == values["val_bpb"] and re.fullmatch(r"\d+\.\d{6}", val_bpb)
            assert memory_gb == f"{float(values['peak_vram_mb']) / 1024:.1f}"
            assert num_steps == values["num_steps"] == str(run.num_steps) and mfu == values["mfu_percent"] == "n/a"


def test_results_tsv_holds_every_run_in_spec_format(night):
    agent = night.agent
    check_rows(agent)
    first = [r for r in agent.runs if r.branch == f"autoresearch/{TAG}"]
    assert [(r.status, r.description) for r in first[:2]] == [("keep", "baseline"), ("discard", "re-run")]
    # any further re-runs the BEST command asked for, and runs step 6 sent `again`, aside:
    verdicts = [(r.status, r.description) for r in first if r.description != "re-run" and "(slow)" not in r.description]
    assert verdicts == [("keep", "baseline"), ("crash", "narrower MLP (3x)"), ("keep", BETTER[2])]
    for i, r in enumerate(first):
        if r.description.endswith(" (slow)"):  # logged as a discard, then its commit runs again
            assert r.status == "discard" and first[i + 1].commit == r.commit


def test_results_tsv_untracked_and_never_overwritten(night):
    agent = night.agent
    assert agent.sh("git ls-files results.tsv run.log").strip() == ""
    assert agent.sh("git check-ignore results.tsv run.log").split() == ["results.tsv", "run.log"]
    before = rows_of(agent.cwd)
    agent.do("header")  # the setup command again, as on a later night: appends nothing, wipes nothing
    assert rows_of(agent.cwd) == before


def test_logs_and_grep(night, second_night):
    """Every finished run's log: a header, then one line a step starting with `step` (no carriage
    return in a log file), then the full summary block, which the grep reads."""
    for run in night.agent.runs:
        values = summary(run.log)
        if run.status == "crash":
            assert "val_bpb:" not in run.grep_output and not values
            continue
        result = [line for line in run.grep_output.splitlines() if not line.startswith(HEADER_LINES)]
        assert result == [f"{key + ':':<18}{values[key]}" for key in ("val_bpb", "peak_vram_mb", "num_steps")]
        assert "\r" not in run.log
        header, _, rest = run.log.partition("\nstep ")
        steps = re.findall(r"^step (\d{5}) ", "step " + rest, re.M)
        assert [int(s) for s in steps] == list(range(run.num_steps))  # one line a step, step 0 included
        assert header.startswith("device: ") and "\n---\n" not in header
        tail = run.log.split("\n---\n")[-1].splitlines()
        assert [line[:18].rstrip().rstrip(":") for line in tail] == SUMMARY_KEYS, tail
        assert all(line[17] == " " and line[18] != " " for line in tail), tail  # keys padded to 18 columns
        assert re.fullmatch(r"\d+\.\d{6}", tail[0][18:])
        assert re.fullmatch(r"\d+", tail[6][18:]) and tail[8][18:] == "1"  # the shrunk depth


def test_second_night_remembers_the_first(night, second_night):
    """The second night's setup, from main: every run of the first shows, its kept commit with its
    gain, its branch; the night starts at the first one's tip, whatever is checked out."""
    setup = second_night.setup
    for run in night.agent.runs[:second_night.first_rows]:
        assert f"{run.commit[:7]}\t" in setup["history"] and f"\t{run.status}\t{run.description}\t" in setup["history"]
    (kept,) = expected_kept(parse(setup["history"]))
    line = setup["kept_before"].rstrip("\n").split("\t")
    assert line[:3] == [f"autoresearch/{TAG}", night.kept[:7], kept[2]] and line[4] == BETTER[2]
    assert abs(float(line[3].removeprefix("gain ")) - kept[3]) < 1e-6 and kept[3] > 0
    assert re.search(rf"autoresearch/{TAG}\s+{night.kept[:7]} ", setup["branches"])
    assert second_night.start == night.kept
    history = night.agent.sh(f"git log --format=%H autoresearch/{TAG2}").split()
    assert history == [second_night.kept, night.kept, night.start]


def test_busy_machine_is_told_from_a_bad_idea(second_night):
    """The slow re-run was left out of BEST and NOISE (the command asked for another), and the
    idea's slow run was logged `(slow)` and run again, so its verdict is the full-speed run's."""
    agent = second_night.agent
    check_rows(agent)
    rows = parse((agent.cwd / "results.tsv").read_text())
    tonight = [r for r in rows if r["branch"] == f"autoresearch/{TAG2}"]
    assert [(r["status"], r["description"]) for r in tonight][:2] == [("keep", "baseline"), ("discard", "re-run")]
    verdicts = [(r["status"], r["description"]) for r in tonight if r["description"] != "re-run"]
    assert [v for v in verdicts if "(slow)" not in v[1]] == [("keep", "baseline"), ("discard", WORSE[2]),
                                                             ("keep", BETTER_AGAIN[2])]
    assert tonight[-2]["description"] == f"{BETTER_AGAIN[2]} (slow)" and tonight[-1]["status"] == "keep"
    assert tonight[-2]["commit"] == tonight[-1]["commit"] == second_night.kept[:7]
    slow = [r for i, r in enumerate(tonight) if i not in counted(tonight)]
    assert slow[0] is tonight[1] and slow[-1]["description"] == f"{BETTER_AGAIN[2]} (slow)"
    # the night's tip now: the idea, its BEST from the full-speed run alone; the command agrees with
    # that (Agent.figures checks it), whether it gives numbers or asks for a re-run
    assert [r for i, r in enumerate(tonight) if i in counted(tonight) and r["commit"] == tonight[-1]["commit"]] == [
        tonight[-1]]
    agent.figures()


def test_morning_commands_show_tonights_commits_only(night, second_night):
    """README's morning `git log`, filled in for each night: that night's kept commit alone."""
    readme = (ROOT / "README.md").read_text()
    (command,) = [line.split("  #")[0].strip() for line in readme.splitlines() if line.startswith("git log")]
    agent = night.agent
    for tag, kept in ((TAG, night.kept), (TAG2, second_night.kept)):
        out = agent.sh(command.replace("<tag>", tag)).splitlines()
        assert [line.split()[0] for line in out] == [kept[:7]], out


def test_notebook_summarises_each_night(night, second_night):
    """README's headless notebook command in the repository after both nights: each night's
    baseline, best and kept changes, as program.md defines them, and no baseline ranked as a gain."""
    agent = night.agent
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"^(uv run jupyter execute analysis\.ipynb[^#\n]*?)\s*(?:#.*)?$", readme, re.M)
    env = {**agent.env, "PATH": os.path.dirname(sys.executable) + os.pathsep + agent.env.get("PATH", "")}
    subprocess.run(["bash", "-c", command.replace("uv run ", "", 1)], cwd=agent.cwd, env=env, check=True,
                   capture_output=True, timeout=300)
    executed = nbformat.read(agent.cwd / "progress.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    nights = expected_nights(parse((agent.cwd / "results.tsv").read_text()))
    assert list(nights) == [f"autoresearch/{TAG}", f"autoresearch/{TAG2}"]
    for (name, (base, best, kept)), commit in zip(nights.items(), (night.kept, second_night.kept)):
        block = text.split(f"\n{name}: ", 1)[1].split("\nautoresearch/", 1)[0]
        m = re.search(r"baseline val_bpb: (\S+) \((\d+) runs? of \w+\)\n\s+best val_bpb: (\S+) ", block)
        assert m and int(m.group(2)) == len(base), block
        assert abs(float(m.group(1)) - statistics.mean(base)) < 1e-6
        assert abs(float(m.group(3)) - statistics.mean(best)) < 1e-6
        ((gain, kept_commit, _, description),) = kept
        ranked = [line for line in block.split("kept changes", 1)[1].splitlines() if line.startswith("    ")]
        assert kept_commit == commit[:7] and len(ranked) == 1, block
        assert ranked[0].split(None, 3)[2:] == [kept_commit, description], block
        assert abs(float(ranked[0].split()[0]) - gain) < 1e-6, (ranked, gain)


# ---------------------------------------------------------------------------
# Several GPUs: two worktrees, two runs at once, one shared cache (cold: both write its token cache)


def test_one_agent_per_gpu(tmp_path_factory, tiny_cache, pytestconfig):
    """Two agents set up their worktrees and run their baselines at the same time (17-25 s on 2
    cores); then a later night's branch goes into a kept worktree."""
    SCENARIOS.add("per-gpu")
    main = make_repo(tmp_path_factory.mktemp("per-gpu"), tiny_cache, pytestconfig)
    setup_commit = main.head()
    setup_steps(main)
    agents = []
    for n in ("0", "1"):
        agent = Agent(main.cwd, main.env, main.program)
        agent.do("gpu_worktree", N=n)
        agent.do("gpu_branch", N=n, tag=TAG)
        agent.cd("gpu_cd", N=n)
        agent.do("header")
        agents.append(agent)
    runs = [subprocess.Popen(["bash", "-c", a.command("gpu_run", N=n)], cwd=a.cwd, env=a.env)
            for n, a in zip("01", agents)]
    assert [p.wait(timeout=600) for p in runs] == [0, 0]
    for n, agent in zip("01", agents):
        assert agent.branch() == f"autoresearch/{TAG}-gpu{n}"
        run = agent.read_result("baseline", agent.head())
        assert run.commit == setup_commit and run.val_bpb is not None, run.log[-3000:]
        agent.log_row(run, "keep")
        check_rows(agent)
    seen = agents[1].do("gpu_others").splitlines()
    assert seen.count(HEADER) == 2 and [r.split("\t")[0] for r in seen if r != HEADER] == [setup_commit[:7]] * 2
    assert [r.split("\t")[-1] for r in seen if r != HEADER] == [f"autoresearch/{TAG}-gpu0", f"autoresearch/{TAG}-gpu1"]
    assert agents[0].figures() == "RERUN"  # each agent's own night: its baseline alone, no pair yet
    for n in "01":  # git holds only the setup commit: nothing was kept
        assert main.sh(f"git log --format=%H autoresearch/{TAG}-gpu{n}").split() == [setup_commit]

    # a later night: the worktree exists, so only tonight's branch is made in it
    (main.cwd / "train.py").write_text((main.cwd / "train.py").read_text() + "\n")
    main.sh("git commit -qam 'a later start'")
    main.do("gpu_worktree", N="0")
    main.do("gpu_branch", N="0", tag=TAG + "2")
    assert main.head("../autoresearch-gpu0") == main.head()
    assert (main.cwd / "../autoresearch-gpu0/results.tsv").read_text().count("\tbaseline") == 1  # last night's row kept


def test_one_agent_runs_waves(tmp_path_factory, tiny_cache, pytestconfig):
    """A baseline wave and a wave of two candidates, each two runs side by side: 20-35 s on 2 cores,
    the least that shows a wave's whole cycle (a re-run or a slow candidate the rule asks for runs
    in a wave of its own). Only the winner is kept, and only if step 6's rule keeps it."""
    SCENARIOS.add("waves")
    agent = make_repo(tmp_path_factory.mktemp("waves"), tiny_cache, pytestconfig)
    setup_commit = agent.head()
    setup_steps(agent, TAG)
    gpus = ["0", "1"]
    for i in gpus:
        agent.do("wave_worktree", i=i)

    def wave(ideas, used=gpus, again=False):
        """In the worktrees used: reset each and commit its idea (none for the tip), unless they
        run `again` as they are; run them all at once and read each result, in their order."""
        agent.prepare_wave(ideas, used, again)
        agent.do("wave_run", gpus=" ".join(used))
        return [agent.read_result(idea[2] if idea else "re-run", agent.head(f"../wave{i}"), where=f"../wave{i}",
                                  grep="wave_grep", tail=None) for i, idea in zip(used, ideas)]

    def log(run, status, i, description=None):
        agent.log_row(run, status, description, row="wave_row", i=i)

    base, again = wave([None, None])
    assert base.commit == again.commit == setup_commit and None not in (base.val_bpb, again.val_bpb)
    log(base, "keep", "0", "baseline")
    log(again, "discard", "1")
    figures = agent.figures()
    while figures == "RERUN":
        log(wave([None], ["0"])[0], "discard", "0")
        figures = agent.figures()

    ideas = [WAVE_WORSE, BETTER]
    runs = wave(ideas)
    assert len({r.commit for r in runs}) == 2 and setup_commit not in {r.commit for r in runs}
    for _ in range(2):  # step 6's `again` holds for any candidate: it runs again, in its own worktree
        slow = [j for j, r in enumerate(runs) if decide(r, figures) == "again"]
        if not slow:
            break
        for j in slow:
            log(runs[j], "discard", str(j), f"{runs[j].description} (slow)")
        rerun = wave([ideas[j] for j in slow], [str(j) for j in slow], again=True)
        for j, r in zip(slow, rerun):
            runs[j] = r
    winner = min(runs, key=lambda r: r.val_bpb)
    i = str(runs.index(winner))
    status = decide(winner, figures, agent.do("wave_numstat", i=i), again=False)
    assert (winner.description, status) == (BETTER[2], "keep"), (runs, figures)
    for j, run in enumerate(runs):
        log(run, status if run is winner else "discard", str(j))
    agent.do("merge", commit=winner.commit)
    for i in gpus:  # the next wave starts at the new tip
        agent.do("wave_reset", i=i, tag=TAG)

    check_rows(agent)
    rows = parse((agent.cwd / "results.tsv").read_text())
    assert {r["branch"] for r in rows} == {f"autoresearch/{TAG}"}
    assert [r["status"] for r in rows][:2] + [r["status"] for r in rows][-2:] == ["keep", "discard", "discard", "keep"]
    assert agent.sh(f"git log --format=%H autoresearch/{TAG}").split() == [winner.commit, setup_commit]
    assert agent.sh("git log --all --format=%H").split() == [winner.commit, setup_commit]  # the loser is gone
    assert agent.sh("git status --porcelain").strip() == ""


def test_every_program_command_ran():
    """Last: the scenarios above ran every command of program.md between them (test_cluster.py checks
    the cluster's)."""
    if SCENARIOS != {"night", "second night", "per-gpu", "waves"}:
        pytest.skip(f"only {sorted(SCENARIOS)} of the four scenarios ran in this session")
    assert set(ROLES) - CLUSTER_ROLES - RAN == set()
