"""The GPU-side tools that run off CPUs too: the trace reader, the instrumented copy of train.py and
the meta-device count of what the compiled training step keeps for its backward."""

import builtins
import os
import re
import subprocess
import symtable
import sys

import pytest
import torch

import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_cluster  # noqa: E402
import gpu_gaps  # noqa: E402
import saved_activations  # noqa: E402
from train_source import edit_code, load_definitions  # noqa: E402


def kernel(name, ts, dur, corr):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_gpu_gaps_counts_overlaps_once_and_names_the_launching_op():
    events = [
        kernel("a", 0, 100, 1),
        kernel("b", 50, 100, 2),  # overlaps a: busy 0-150
        kernel("c", 400, 50, 3),  # 250 us idle before it
        kernel("d", 460, 40, 4),  # 10 us idle before it
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 390, "dur": 5, "args": {"correlation": 3}},
        {"ph": "X", "cat": "cpu_op", "name": "outer", "ts": 300, "dur": 100, "args": {}},
        {"ph": "X", "cat": "cpu_op", "name": "inner", "ts": 380, "dur": 15, "args": {}},
        {"ph": "X", "cat": "cpu_op", "name": "finished before", "ts": 10, "dur": 20, "args": {}},
        {"ph": "i", "cat": "kernel", "name": "instant, ignored", "ts": 200},
    ]
    span, busy, gaps = gpu_gaps.analyse({"traceEvents": events})
    assert span == 500
    assert busy == 150 + 50 + 40
    assert [(g[0], g[1], g[2]) for g in gaps] == [(250, "b", "c"), (10, "c", "d")]
    assert gaps[0][3] == ["outer", "inner"]  # running when c was launched, outermost first
    assert gaps[1][3] == []  # d's launch was not recorded
    events += [kernel("a", 600, 30, 5), {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 700, "dur": 7,
                                         "args": {}}]
    expected = [("a", 130, 2), ("b", 100, 1), ("c", 50, 1), ("d", 40, 1), ("Memset", 7, 1)]
    assert gpu_gaps.by_name({"traceEvents": events}) == expected


def test_gpu_gaps_refuses_a_trace_without_kernels():
    with pytest.raises(SystemExit, match="no GPU kernels"):
        gpu_gaps.analyse({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]})


def undefined_globals(source, filename):
    """Names read somewhere in the file that the module never binds and Python does not provide."""
    top = symtable.symtable(source, filename, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    bound |= {c.get_name() for c in top.get_children()}  # functions and classes defined at the top
    missing, tables = set(), [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for s in table.get_symbols():
            if (s.is_global() or table is top) and s.is_referenced() and not s.is_assigned() and not s.is_parameter():
                missing.add(s.get_name())
    return sorted(n for n in missing - bound - {"__file__"} if not hasattr(builtins, n))


def test_make_instrumented_still_applies_to_train_py(tmp_path):
    """Its edits replace lines of train.py's code: a change to train.py that moves one of them must
    fail here, not on the GPU box."""
    out = tmp_path / "train_instrumented.py"
    tool = os.path.join(ROOT, "benchmarks", "make_instrumented.py")
    subprocess.run([sys.executable, tool, "train.py", str(out)], check=True, cwd=ROOT)
    source = out.read_text()
    marks = ("[startup] {name}", "[mem] peak incl optimizer", "[prof] steps 15-17", "export_chrome_trace",
             "[eval] first forward")
    for mark in marks:
        assert mark in source
    assert undefined_globals(source, str(out)) == []


def test_undefined_globals_finds_a_missing_import():
    assert undefined_globals("import time\ndef f():\n    return os.getcwd(), time.time(), len([])\n", "x.py") == ["os"]


def tiny_config():
    """A two-layer model small enough to trace on the meta device in seconds."""
    tr = load_definitions()
    return tr.GPTConfig(sequence_len=256, vocab_size=384, n_layer=2, n_head=1, n_kv_head=1, n_embd=128, fused_mlp=True,
                        fused_loss=True)


def test_compiled_step_keeps_one_hidden_activation_per_mlp_and_one_logit_gradient():
    """Traced on the meta device through Inductor's partitioner: each fused MLP keeps relu(h)² only
    (keeping h as well doubled its share of the peak), the fused loss its logits' gradient only."""
    config = tiny_config()
    saved, backward = saved_activations.saved_activations(config, batch=4)
    tokens = 4 * 256
    shapes = [shape for _, shape, _, _ in saved]
    assert shapes.count((tokens, 4 * 128)) == 2  # one per layer
    assert shapes.count((tokens, 384)) == 1
    # no float32 activations
    assert all(dtype == torch.bfloat16 or nbytes < tokens * 128 for _, _, dtype, nbytes in saved)
    tr = load_definitions()
    mlp_backward = f"autoresearch.mlp_{tr.OPS_VERSION}_backward.default"
    assert backward[mlp_backward] == 2 and backward["autoresearch.meta_trace_bwd.default"] == 2


def test_norm_that_keeps_its_output_saves_three_activations_per_layer(tmp_path):
    """train.py's RMSNorm keeps its output (which the next matmul or attention keeps anyway), not
    its input: at least three fewer (tokens x width) activations per layer than F.rms_norm."""
    source = open(os.path.join(ROOT, "train.py")).read()
    plain = tmp_path / "train_plain_norm.py"
    plain.write_text(edit_code(source, "norm = RMSNorm.apply\n", "norm = lambda x: F.rms_norm(x, (x.size(-1),))\n"))
    config = tiny_config()
    counts = []
    for path in (os.path.join(ROOT, "train.py"), str(plain)):
        saved, _ = saved_activations.saved_activations(config, batch=4, train_path=path)
        counts.append(sum(nbytes == 4 * 256 * 128 * 2 for _, _, _, nbytes in saved))  # bf16, tokens x width
    assert counts[0] <= counts[1] - 3 * config.n_layer, counts


def test_every_result_file_is_cited_and_every_citation_exists():
    """benchmarks/results/ holds the evidence behind benchmarks/README.md and LOG.md: no orphan
    file, no figure citing a file that is gone."""
    folder = os.path.join(ROOT, "benchmarks")
    text = open(os.path.join(folder, "README.md")).read() + open(os.path.join(folder, "LOG.md")).read()
    files = set(os.listdir(os.path.join(folder, "results")))
    cited = set(re.findall(r"\d{4}-\d{2}-\d{2}-[\w.-]+\.(?:log|txt)", text))
    assert sorted(files - cited) == [] and sorted(cited - files) == []


def test_changed_model_copies_apply_and_load(tmp_path):
    """bench_changed.py's copies of train.py: every edit applies once, and each copy's model builds
    and runs a forward and backward (a tiny config; the edited hyperparameters as written)."""
    import bench_changed

    source = open(os.path.join(ROOT, "train.py")).read()
    for name, edit in bench_changed.EDITS.items():
        path = tmp_path / f"train_{name}.py"
        path.write_text(edit(source))
        tr = load_definitions(str(path))
        expected = {"window_sl": ("WINDOW_PATTERN", "SL"), "width_768": ("ASPECT_RATIO", 96), "depth_10": ("DEPTH", 10)}
        if name in expected:
            assert getattr(tr, expected[name][0]) == expected[name][1]
        n_kv_head = 1 if name == "one_kv_head" else 2
        config = tr.GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=64)
        model = tr.GPT(config, prepare.make_attention("sdpa", torch.device("cpu"), 64))
        model.init_weights()
        idx = torch.randint(0, 128, (2, 64))
        model(idx, idx).backward()
    assert "n_kv_head=1" in bench_changed.EDITS["one_kv_head"](source)


def test_bench_cluster_times_program_md_submit_command():
    """bench_cluster.py measures the command the agent runs: program.md's, for one worktree."""
    command = bench_cluster.submit_command("/some/worktree")
    submit = "out=$(uv run --only-group cluster ray job submit --no-wait --working-dir /some/worktree "
    assert command.startswith(submit)
    assert "timeout --foreground 600 uv run train.py' 2>&1)" in command and "wave" not in command
    assert command.endswith("exec uv run --only-group cluster ray job logs --follow $id")

