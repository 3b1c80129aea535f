"""Execute analysis.ipynb with a real Jupyter kernel on well-formed and damaged results.tsv files,
and run the README's headless command on a copy of the notebook."""

import json
import math
import os
import re
import shutil
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
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Case:
    text: str  # the file as written
    rows: list  # the rows the notebook can read: (commit, val_bpb, memory_gb, status, description) as written
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
    ("f6a7b8c", "0.986400", "44.9 ", "Keep", "longer warmup plus a cosine schedule that ends at 10% of the peak learning rate"),
    ("0a1b2c3", "0.984100", "45.3", "keep", "add value embeddings"),
    ("9f8e7d6", "0.990000", "45.0", " discard", "try 12 layers"),
]
BASELINE_ONLY = [("a1b2c3d", "0.997900", "44.0", "keep", "baseline")]
ALL_CRASH = [("a1b2c3d", "0.000000", "0.0", "crash", "baseline (broken env)"), ("b2c3d4e", "0.000000", "0.0", " Crash ", "retry")]
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
}


def finished(row):
    """program.md's meaning of a finished run: kept or discarded, with a finite val_bpb above 0."""
    _, val, _, status, _ = row
    try:
        v = float(val)
    except ValueError:
        return False
    return status.strip().lower() in ("keep", "discard") and math.isfinite(v) and v > 0


def expected_summary(rows):
    """(baseline, best, gains in file order) straight from the readable rows, or None if nothing finished."""
    ok = [(float(v), s.strip().lower(), d) for c, v, _, s, d in rows if finished((c, v, _, s, d))]
    if not ok:
        return None
    baseline = ok[0][0]
    best, gains = baseline, []
    for v, s, d in ok[1:]:
        if s == "keep":
            gains.append((best - v, d))
            best = min(best, v)
    return baseline, best, gains


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
    n_finished = sum(finished(r) for r in case.rows)
    n_crash = sum(r[3].strip().lower() == "crash" for r in case.rows)
    assert f"saved progress.png: {n_finished} finished runs, {n_crash} crashes" in stdout.splitlines()


def test_summary_lines(run):
    case, _, stdout = run
    lines = stdout.splitlines()
    exp = expected_summary(case.rows)
    if exp is None:
        assert "no successful runs" in lines
        assert not any(line.startswith(("baseline val_bpb:", "best val_bpb:")) for line in lines)
        return
    baseline, best, _ = exp
    assert f"baseline val_bpb: {baseline:.6f}" in lines
    assert f"best val_bpb: {best:.6f}" in lines
    assert f"total improvement: {baseline - best:.6f} ({100 * (baseline - best) / baseline:.2f}%)" in lines
    assert "no successful runs" not in lines


def test_counts_and_ranking(run):
    case, _, stdout = run
    statuses = [r[3].strip().lower() for r in case.rows]
    assert f"total experiments: {len(case.rows)}" in stdout
    assert (f"keep: {statuses.count('keep')}  discard: {statuses.count('discard')}  "
            f"crash: {statuses.count('crash')}") in stdout
    # every kept commit is listed verbatim (a hash like 1234567 must not turn into a number)
    for c, _, _, s, _ in case.rows:
        if s.strip().lower() == "keep":
            assert c in stdout
    exp = expected_summary(case.rows)
    if exp is None:
        return
    # kept changes appear largest gain first
    ranked = stdout.split("kept changes ranked by gain", 1)[1]
    order = [d for _, d in sorted(exp[2], key=lambda g: -g[0])]
    positions = [ranked.index(d) for d in order]
    assert positions == sorted(positions)


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
    assert f"best val_bpb: {expected_summary(MIXED)[1]:.6f}" in text
