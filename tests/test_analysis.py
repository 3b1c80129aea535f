"""Execute analysis.ipynb with a real Jupyter kernel on a few results.tsv fixtures."""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "analysis.ipynb"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# rows are written verbatim (stray spaces and odd case included) so the notebook has to clean them up
CASES = {
    "mixed": [
        ("a1b2c3d", "0.997900", "44.0", "keep", "baseline"),
        ("1234567", " 0.993200 ", "44.2", " KEEP ", "raise matrix LR to 0.04"),
        ("c3d4e5f", "1.004100", "44.0", "Discard", "switch ReLU^2 to GeLU"),
        ("d4e5f6a", "0.000000", "0.0", "CRASH", "double model width (OOM)"),
        ("e5f6a7b", "0.995000", " 44.1", "discard ", "weight decay 0.2"),
        ("f6a7b8c", "0.986400", "44.9 ", "Keep", "longer warmup plus a cosine schedule that ends at 10% of the peak learning rate"),
        ("0a1b2c3", "0.984100", "45.3", "keep", "add value embeddings"),
        ("9f8e7d6", "0.990000", "45.0", " discard", "try 12 layers"),
    ],
    "baseline_only": [
        ("a1b2c3d", "0.997900", "44.0", "keep", "baseline"),
    ],
    "all_crash": [
        ("a1b2c3d", "0.000000", "0.0", "crash", "baseline (broken env)"),
        ("b2c3d4e", "0.000000", "0.0", " Crash ", "retry"),
    ],
    "header_only": [],
}


def expected_summary(rows):
    """(baseline, best, gains in file order) straight from the fixture rows, or None if nothing succeeded."""
    ok = [(c, float(v), s.strip().lower(), d) for c, v, _, s, d in rows
          if s.strip().lower() != "crash" and float(v) > 0]
    if not ok:
        return None
    baseline = ok[0][1]
    best, gains = baseline, []
    for c, v, s, d in ok[1:]:
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
    """Execute the notebook once per fixture file; all checks for that case share the result."""
    rows = CASES[request.param]
    work = tmp_path_factory.mktemp(request.param)
    tsv = work / "results.tsv"
    tsv.write_text("\n".join([HEADER] + ["\t".join(r) for r in rows]) + "\n")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    km = AsyncKernelManager(kernel_name="python3",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]))
    client = NotebookClient(nb, km=km, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(work)}})
    env = dict(os.environ, RESULTS_TSV=str(tsv), PYDEVD_DISABLE_FILE_VALIDATION="1")
    client.execute(env=env)  # raises CellExecutionError if any cell fails

    stdout = "".join(out["text"] for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")
    return rows, work, nb, stdout


def test_ran_without_errors(run):
    _, _, nb, _ = run
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_progress_png_written(run):
    _, work, _, _ = run
    png = work / "progress.png"
    assert png.is_file()
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_summary_lines(run):
    rows, _, _, stdout = run
    lines = stdout.splitlines()
    exp = expected_summary(rows)
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
    rows, _, _, stdout = run
    statuses = [r[3].strip().lower() for r in rows]
    assert f"total experiments: {len(rows)}" in stdout
    assert (f"keep: {statuses.count('keep')}  discard: {statuses.count('discard')}  "
            f"crash: {statuses.count('crash')}") in stdout
    # every kept commit is listed verbatim (a hash like 1234567 must not turn into a number)
    for c, _, _, s, _ in rows:
        if s.strip().lower() == "keep":
            assert c in stdout
    exp = expected_summary(rows)
    if exp is None:
        return
    # kept changes appear largest gain first
    ranked = stdout.split("kept changes ranked by gain", 1)[1]
    order = [d for _, d in sorted(exp[2], key=lambda g: -g[0])]
    positions = [ranked.index(d) for d in order]
    assert positions == sorted(positions)
