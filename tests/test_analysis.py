"""Execute analysis.ipynb with a real Jupyter kernel on well-formed and damaged results.tsv files,
in the original five-column format and in program.md's eight, and run the README's headless
command on a copy of the notebook. The expected summaries come from program.md's definitions,
written out here once (test_loop.py checks its commands against the same ones)."""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "analysis.ipynb"
COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "num_steps", "mfu_percent", "branch"]
HEADER = "\t".join(COLUMNS[:5])  # the original format
HEADER8 = "\t".join(COLUMNS)  # program.md's
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Case:
    text: str  # the file as written
    rows: list  # the rows the notebook can read, as written: (commit, val_bpb, memory_gb, status, description, ...)
    problems: list  # one (start of the problem line, phrase in it) per problem planted in the file


def table(rows, header=HEADER):
    return "\n".join([header] + ["\t".join(r) for r in rows]) + "\n"


# rows are written verbatim (stray spaces and odd case included) so the notebook has to clean them up
MIXED = [
    ("a1b2c3d", "0.997900", "44.0", "keep", "baseline"),
    ("1234567", " 0.993200 ", "44.2", " KEEP ", "raise matrix LR to 0.04"),
    ("c3d4e5f", "1.004100", "44.0", "Discard", "switch ReLU^2 to GeLU"),
    ("d4e5f6a", "0.000000", "0.0", "CRASH", "double model width (OOM)"),
    ("e5f6a7b", "0.995000", " 44.1", "discard ", "weight decay 0.2"),
    ("f6a7b8c", "0.986400", "44.9 ", "Keep",
     "longer warmup plus a cosine schedule that ends at 10% of the peak learning rate"),
    ("0a1b2c3", "0.984100", "45.3", "keep", "add value embeddings"),
    ("9f8e7d6", "0.990000", "45.0", " discard", "try 12 layers"),
]
BASELINE_ONLY = [("a1b2c3d", "0.997900", "44.0", "keep", "baseline")]
ALL_CRASH = [("a1b2c3d", "0.000000", "0.0", "crash", "baseline (broken env)"),
             ("b2c3d4e", "0.000000", "0.0", " Crash ", "retry")]
# one problem per line from line 3 on; lines 2 and 8 are clean
DAMAGED = (HEADER + "\n"
           "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
           "b2c3d4e\t0.993000\t44.1\tkeep\n"
           "c3d4e5f\t0.991000\t44.0\tdiscard\ttry GELU\t(tanh form)\n"
           "d4e5f6a\tinf\t44.0\tkeep\tlr 10x\n"
           "e5f6a7b\tn/a\t44.0\tdiscard\thalve the batch\n"
           "f6a7b8c\t0.985000\t44.2\tmaybe\tadd value embeddings\n"
           "0a1b2c3\t0.988000\t44.3\tkeep\twarmdown 0.6\n"
           "1b2c3d4\t0.000000\t0.0\tcrash\tdouble width (OOM)\n")
DAMAGED_ROWS = [
    ("a1b2c3d", "0.997900", "44.0", "keep", "baseline"),
    ("c3d4e5f", "0.991000", "44.0", "discard", "try GELU (tanh form)"),
    ("d4e5f6a", "inf", "44.0", "keep", "lr 10x"),
    ("e5f6a7b", "n/a", "44.0", "discard", "halve the batch"),
    ("f6a7b8c", "0.985000", "44.2", "maybe", "add value embeddings"),
    ("0a1b2c3", "0.988000", "44.3", "keep", "warmdown 0.6"),
    ("1b2c3d4", "0.000000", "0.0", "crash", "double width (OOM)"),
]
NO_MEMORY = [("a1b2c3d", "0.997900", "keep", "baseline"), ("b2c3d4e", "0.990000", "keep", "lower lr")]
# two nights in the original format: the second night's baseline is no kept change of the first
OLD_NIGHTS = [
    ("a1b2c3d", "1.000000", "44.0", "keep", "baseline"),
    ("a1b2c3d", "1.001000", "44.0", "discard", "baseline repeat (noise)"),
    ("b2c3d4e", "0.995000", "44.0", "keep", "raise matrix LR"),
    ("c3d4e5f", "0.000000", "0.0", "crash", "double width"),
    ("b2c3d4e", "0.981000", "44.0", "keep", "baseline"),
    ("d4e5f6a", "0.979000", "44.1", "keep", "warmdown 0.6"),
]
N1, N2 = "autoresearch/nov27", "autoresearch/nov28"
# two nights in program.md's format: re-runs that move BEST, a slow run (left out), a crash, a night
# starting from the last one's tip, a kept deletion a little worse than BEST
NIGHTS = [
    ("a1b2c3d", "0.997900", "44.0", "keep", "baseline", "953", "39.80", N1),
    ("a1b2c3d", "0.998400", "44.0", "discard", "re-run", "951", "39.75", N1),
    ("b2c3d4e", "0.993200", "44.2", "keep", "raise MATRIX_LR to 0.05", "955", "39.90", N1),
    ("c3d4e5f", "1.006100", "44.0", "discard", "remove value embeddings (slow)", "702", "29.20", N1),
    ("c3d4e5f", "0.995000", "44.0", "discard", "remove value embeddings", "961", "40.10", N1),
    ("d4e5f6a", "0.000000", "0.0", "crash", "double model width (OOM)", "-", "-", N1),
    ("e5f6a7b", "0.992100", "44.2", "keep", "longer warmdown", "950", "39.70", N1),
    ("e5f6a7b", "0.993900", "44.2", "discard", "re-run", "952", "39.80", N1),
    ("f6a7b8c", "0.993500", "43.0", "keep", "drop the logit soft cap (shorter)", "960", "40.00", N1),
    ("f6a7b8c", "0.994000", "43.0", "keep", "baseline", "958", "40.00", N2),
    ("f6a7b8c", "0.993000", "43.0", "discard", "re-run", "959", "40.00", N2),
    ("0a1b2c3", "0.989000", "43.5", "keep", "add value embeddings back (mlp: plain)", "930", "37.00", N2),
]

CASES = {
    "mixed": Case(table(MIXED), MIXED, []),
    "baseline_only": Case(table(BASELINE_ONLY), BASELINE_ONLY, []),
    "all_crash": Case(table(ALL_CRASH), ALL_CRASH, []),
    "header_only": Case(table([]), [], []),
    "damaged_rows": Case(DAMAGED, DAMAGED_ROWS, [
        ("line 3:", "a column missing"),
        ("line 4:", "a tab inside the description"),
        ("line 5:", "val_bpb 'inf' is not a finite number"),
        ("line 6:", "val_bpb 'n/a' is not a number"),
        ("line 7:", "unknown status 'maybe'"),
    ]),
    "empty_file": Case("", [], [("", "is empty")]),
    "header_without_memory": Case(table(NO_MEMORY, "commit\tval_bpb\tstatus\tdescription"),
                                  [(c, v, "", s, d) for c, v, s, d in NO_MEMORY],
                                  [("line 1:", "no memory_gb column")]),
    "nights": Case(table(NIGHTS, HEADER8), NIGHTS, []),
    # a file begun in the original format (two nights) and continued in program.md's: the new rows keep their columns
    "old_then_new": Case(table(OLD_NIGHTS + NIGHTS[9:]), OLD_NIGHTS + NIGHTS[9:], []),
    "damaged_new": Case(HEADER8 + "\n" + "\t".join(NIGHTS[0]) + "\n"
                        + "\t".join(NIGHTS[2][:4] + ("raise\tMATRIX_LR",) + NIGHTS[2][5:]) + "\n"
                        + "\t".join(NIGHTS[4][:5] + ("961 steps",) + NIGHTS[4][6:]) + "\n",
                        [NIGHTS[0], NIGHTS[2][:4] + ("raise MATRIX_LR",) + NIGHTS[2][5:],
                         NIGHTS[4][:5] + ("",) + NIGHTS[4][6:]],
                        [("line 3:", "a tab inside the description"), ("line 4:", "num_steps '961 steps'")]),
}


# ---------------------------------------------------------------------------
# program.md's definitions, for rows as dicts of text (COLUMNS; missing columns empty)


def as_dict(row):
    return dict(zip(COLUMNS, tuple(x.strip() for x in row) + ("",) * (len(COLUMNS) - len(row))))


def value(row):
    try:
        return float(row["val_bpb"])
    except ValueError:
        return math.nan


def steps(row):
    return int(row["num_steps"]) if row.get("num_steps", "").isdigit() else None


def done(row):
    """A finished run: kept or discarded, with a finite val_bpb above 0 (a crash logs 0.000000)."""
    return row["status"].strip().lower() in ("keep", "discard") and math.isfinite(value(row)) and value(row) > 0


def by_night(rows):
    """{night: its rows, in order}: a row's branch; rows without one start a new night at each
    `baseline` row, named `night <k>` as program.md's step 3 names them."""
    nights, k = {}, 0
    for r in rows:
        k += r["description"] == "baseline"
        nights.setdefault(r.get("branch") or f"night {k}", []).append(r)
    return nights


def counted(rows):
    """The indices of one night's rows that count: finished, and not slow (under 90% of the mean
    num_steps of their commit's finished runs that night, where steps are known)."""
    known = {}
    for r in rows:
        if done(r) and steps(r) is not None:
            known.setdefault(r["commit"], []).append(steps(r))
    return [i for i, r in enumerate(rows) if done(r)
            and (steps(r) is None or steps(r) >= 0.9 * statistics.mean(known[r["commit"]]))]


def expected_nights(rows):
    """{night: (baseline runs, best runs, kept changes)}: the tip is the last kept commit; the
    baseline is the night's first, the best its last (the val_bpb of their counted runs); each
    later kept commit is a change, its gain the mean of the counted runs of the commit it replaced
    minus its own val_bpb: [(gain, commit, val_bpb as written, description)]."""
    out = {}
    for night, runs in by_night(rows).items():
        seen = {}
        for i in counted(runs):
            seen.setdefault(runs[i]["commit"], []).append(value(runs[i]))
        keeps, kept = [], []
        for r in runs:
            if done(r) and r["status"].strip().lower() == "keep":
                if keeps and r["commit"] != keeps[-1]:
                    gain = statistics.mean(seen[keeps[-1]]) - value(r)
                    kept.append((gain, r["commit"], r["val_bpb"], r["description"]))
                keeps.append(r["commit"])
        out[night] = (seen[keeps[0]], seen[keeps[-1]], kept) if keeps else (None, None, [])
    return out


def expected_kept(rows):
    """Every change each night kept: (night, commit, val_bpb as written, gain, description)."""
    return [(night, c, v, g, d) for night, (_, _, kept) in expected_nights(rows).items() for g, c, v, d in kept]


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory):
    # a private "python3" kernelspec pointing at this interpreter, so the kernel sees the same venv
    # no matter what kernelspecs (if any) are installed on the machine
    root = tmp_path_factory.mktemp("kernels")
    spec = root / "python3"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }))
    return root


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory, kernel_spec_dir):
    """Execute the notebook once per file (a failing cell raises here); the checks share the result."""
    case = CASES[request.param]
    work = tmp_path_factory.mktemp(request.param)
    tsv = work / "results.tsv"
    tsv.write_text(case.text)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    km = AsyncKernelManager(kernel_name="python3",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]))
    client = NotebookClient(nb, km=km, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(work)}})
    env = dict(os.environ, RESULTS_TSV=str(tsv), PYDEVD_DISABLE_FILE_VALIDATION="1")
    client.execute(env=env)

    stdout = "".join(out["text"] for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")
    return case, work, stdout


def test_progress_png_written(run):
    _, work, _ = run
    png = work / "progress.png"
    assert png.is_file()
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_one_line_per_problem(run):
    """Each planted problem gets exactly one `problem:` line naming its line and what is wrong; a
    well-formed file (stray spaces and odd case are fine) gets none."""
    case, _, stdout = run
    found = [line[len("problem: "):] for line in stdout.splitlines() if line.startswith("problem: ")]
    assert len(found) == len(case.problems), found
    for (start, phrase), line in zip(case.problems, found):
        assert line.startswith(start) and phrase in line, (start, phrase, line)


def test_plots_every_finished_run(run):
    case, _, stdout = run
    n_finished = sum(done(as_dict(r)) for r in case.rows)
    n_crash = sum(r[3].strip().lower() == "crash" for r in case.rows)
    assert f"saved progress.png: {n_finished} finished runs, {n_crash} crashes" in stdout.splitlines()


def night_blocks(stdout):
    """{night: the lines the notebook printed for it}."""
    blocks, name = {}, None
    for line in stdout.splitlines():
        m = re.match(r"(\S.*): \d+ runs \(keep", line)
        name = m.group(1) if m else (name if line.startswith("  ") else None)
        if name is not None:
            blocks.setdefault(name, []).append(line)
    return blocks


def test_summary_lines(run):
    """Each night on its own: its baseline and best as the mean of their commits' counted runs,
    the improvement between them; no total across nights."""
    case, _, stdout = run
    lines = stdout.splitlines()
    expected = expected_nights([as_dict(r) for r in case.rows])
    blocks = night_blocks(stdout)
    assert list(blocks) == list(expected)
    for night, (base, best, _) in expected.items():
        block = "\n".join(blocks[night])
        if base is None:
            assert "no baseline" in block and "val_bpb" not in block
            continue
        m = re.search(r"baseline val_bpb: (\S+) \((\d+) runs? of \w+\)\n  best val_bpb: (\S+) \((\d+) runs? of", block)
        assert m, block
        assert abs(float(m.group(1)) - statistics.mean(base)) < 1e-6 and int(m.group(2)) == len(base)
        assert abs(float(m.group(3)) - statistics.mean(best)) < 1e-6 and int(m.group(4)) == len(best)
        improvement = re.search(r"improvement: (\S+) ", block)
        assert improvement and abs(float(improvement[1]) - (statistics.mean(base) - statistics.mean(best))) < 1e-6
    assert ("no successful runs" in lines) == (not any(done(as_dict(r)) for r in case.rows))
    assert not any("total improvement" in line for line in lines)


def test_counts_and_ranking(run):
    case, _, stdout = run
    statuses = [r[3].strip().lower() for r in case.rows]
    assert f"total experiments: {len(case.rows)}" in stdout
    assert (f"keep: {statuses.count('keep')}  discard: {statuses.count('discard')}  "
            f"crash: {statuses.count('crash')}") in stdout
    # every kept commit is listed verbatim (a hash like 1234567 must not turn into a number)
    for r in map(as_dict, case.rows):
        if done(r) and r["status"].lower() == "keep":
            assert r["commit"] in stdout
    # each night's kept changes, largest gain first, with their gains; never a baseline among them
    blocks = night_blocks(stdout)
    for night, (_, _, kept) in expected_nights([as_dict(r) for r in case.rows]).items():
        ranked = [line.split(None, 3) for line in blocks[night] if line.startswith("    ")]
        assert [(c, d) for _, _, c, d in ranked] == [(c, d) for _, c, _, d in sorted(kept, key=lambda k: -k[0])]
        for (shown, _, _, _), (gain, _, _, _) in zip(ranked, sorted(kept, key=lambda k: -k[0])):
            assert abs(float(shown) - gain) < 1e-6


def test_readme_headless_command(tmp_path):
    """The README's morning command, in a folder holding only the notebook and a results.tsv, as in
    a fresh clone: `uv run` puts the environment's scripts first on PATH, so this does the same."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(uv run jupyter execute analysis\.ipynb[^#\n]*?)\s*(?:#.*)?$", readme, re.M)
    assert len(commands) == 1, "README.md should give one headless notebook command"
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    (tmp_path / "results.tsv").write_text(table(MIXED))
    env = {k: v for k, v in os.environ.items() if k != "RESULTS_TSV"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    command = commands[0].replace("uv run ", "", 1)
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "progress.png").read_bytes().startswith(PNG_MAGIC)
    executed = nbformat.read(tmp_path / "progress.ipynb", as_version=4)  # the notebook with its printed summary
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    (_, best, _), = expected_nights([as_dict(r) for r in MIXED]).values()
    assert f"best val_bpb: {statistics.mean(best):.6f}" in text
