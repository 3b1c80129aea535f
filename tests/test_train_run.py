"""Whole runs of the real train.py on CPU: the training loop's bookkeeping, its schedules as they
reach the optimizer, gradient accumulation, the out-of-memory retry and the fast failures.

Each run is a copy of train.py whose small-machine line is shrunk to one layer and 1024 tokens a
step, with a few lines added that print what the loop did (each edit must match train.py exactly
once, so a restructured train.py fails here loudly instead of testing nothing). Runs that several
tests read are module fixtures: one run, many assertions."""

import ast
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import prepare
from conftest import ROOT, SMALL_SEQ_TOKENS, train_copy

TRAIN_PY = os.path.join(ROOT, "train.py")
SEQ_LEN = prepare.SMALL_SEQ_LEN  # what train.py uses without CUDA
TOKENS_PER_STEP = SMALL_SEQ_TOKENS


def run(path, cache, budget, timeout=120):
    """Runs the copy on the CPU with a budget of `budget` seconds and an evaluation of one batch."""
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_TIME_BUDGET=str(budget),
               AUTORESEARCH_EVAL_TOKENS=str(TOKENS_PER_STEP), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")  # one thread: faster than oversubscribed shared cores
    t0 = time.time()
    result = subprocess.run([sys.executable, path], cwd=os.path.dirname(path), env=env, capture_output=True, text=True,
                            timeout=timeout)
    result.wall_seconds = time.time() - t0
    return result


def summary(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    block = result.stdout[result.stdout.index("\n---\n") + 5 :].splitlines()[:9]
    return {key: value.strip() for key, value in (line.split(":", 1) for line in block)}


def status_lines(stdout):
    """(step, ms, mfu text) of each status line."""
    status = r"step (\d+) \(.*?\| (\d+) ms \|.*?\| mfu (\S+) \|"
    return [(int(s), int(ms), mfu) for s, ms, mfu in re.findall(status, stdout)]


def printed(stdout, tag):
    """The Python literals the copy printed after `tag`, one per line."""
    return [ast.literal_eval(line[len(tag) + 1 :]) for line in stdout.splitlines() if line.startswith(tag + " ")]


# Lines added to copies to record what the loop does; they change nothing it computes.
COUNT_TRAINING_FORWARDS = (
    "optimizer = build_optimizer(model, compile_math=use_compile)\n",
    "optimizer = build_optimizer(model, compile_math=use_compile)\n"
    "trained = []  # test: the input shape of every training forward\n"
    "model.register_forward_pre_hook(lambda m, args: trained.append(tuple(args[0].shape)) if m.training else None)\n",
)
PRINT_TRAINED = '\nprint("trained", trained)\n'
SAVE_FIRST_GRADIENT_AND_PRINT_GROUPS = (
    "    optimizer.step()\n",
    "    if step == 0:  # test: the gradient of the first step\n"
    '        torch.save({n: p.grad for n, p in model.named_parameters()}, "first_gradient.pt")\n'
    "    optimizer.step()\n"
    '    print("groups", (step, [(g["kind"], g["initial_lr"], g["lr"], g.get("momentum"), g["weight_decay"])\n'
    '                            for g in optimizer.param_groups]))\n',
)


def first_gradient(folder):
    return torch.load(os.path.join(folder, "first_gradient.pt"))


# ---------------------------------------------------------------------------
# A run on a made-up clock: every step counts 1/4 of a 1 s budget, so that the schedules,
# the stopping rule and MFU have exact expected values. Micro-batches of one row: two a step.

WARMUP, WARMDOWN, FINAL = 0.3, 0.4, 0.1  # not the defaults: a warm-down written with the wrong ratio shows
STEP_SECONDS = 0.25  # progress 0, 0 (the untimed step), 0.25, 0.5, 0.75: warm-up, flat, warm-down
STEPS = 1 + 4  # the untimed one, then four that fill the budget
FAKE_PEAK = 1e10  # FLOP/s; the CPU has none (MFU n/a), so the copy makes one up


@pytest.fixture(scope="module")
def clocked(tiny_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clocked")
    path = train_copy(folder, device_batch=1, tail=PRINT_TRAINED, edits=[
        ("WARMUP_RATIO = 0.0\n", f"WARMUP_RATIO = {WARMUP}\n"),
        ("WARMDOWN_RATIO = 0.5\n", f"WARMDOWN_RATIO = {WARMDOWN}\n"),
        ("FINAL_LR_FRAC = 0.0\n", f"FINAL_LR_FRAC = {FINAL}\n"),
        ("peak = prepare.peak_flops(device)\n", f"peak = {FAKE_PEAK}\n"),
        ("    dt = time.time() - t0\n", f"    dt = {STEP_SECONDS}  # test: a made-up clock\n"),
        COUNT_TRAINING_FORWARDS,
        SAVE_FIRST_GRADIENT_AND_PRINT_GROUPS,
    ])
    result = run(path, tiny_cache, budget=1)
    return folder, result, summary(result)


def test_schedules_reach_the_optimizer_groups_every_step(clocked):
    """The schedules, written here as interpolation tables: the lr multiplier rises linearly over
    WARMUP_RATIO, stays at 1, and falls linearly over the last WARMDOWN_RATIO to FINAL_LR_FRAC;
    Muon's momentum goes 0.85 -> 0.95 over 300 steps; its weight decay is WEIGHT_DECAY*(1-progress).
    Progress is timed seconds over the budget: step 0 is untimed, so step s has seen s-1 steps."""
    _, result, _ = clocked
    groups = printed(result.stdout, "groups")
    assert [step for step, _ in groups] == list(range(STEPS))
    for step, gs in groups:
        progress = max(step - 1, 0) * STEP_SECONDS
        lrm = np.interp(progress, [0, WARMUP, 1 - WARMDOWN, 1], [0, 1, 1, FINAL])
        for kind, initial_lr, lr, momentum, weight_decay in gs:
            assert lr == pytest.approx(initial_lr * lrm, rel=1e-9, abs=1e-12), (step, kind)
            if kind == "muon":
                assert momentum == pytest.approx(np.interp(step, [0, 300], [0.85, 0.95]), rel=1e-12), step
                assert weight_decay == pytest.approx(0.2 * (1 - progress), rel=1e-12, abs=1e-15), step
    assert {kind for kind, *_ in groups[0][1]} == {"adamw", "muon"}


def test_first_step_is_untimed_and_the_run_stops_when_the_budget_is_spent(clocked):
    """One untimed warm-up step on the CPU, then four steps of 0.25 s fill the 1 s budget."""
    _, result, values = clocked
    assert values["num_steps"] == str(STEPS) and values["training_seconds"] == "1.0"
    assert [step for step, *_ in status_lines(result.stdout)] == list(range(STEPS))


def test_every_step_trains_its_tokens_in_micro_batches(clocked):
    """TOTAL_BATCH_SIZE tokens a step, in TOTAL_BATCH_SIZE / (DEVICE_BATCH_SIZE x SEQ_LEN) = 2
    micro-batches of one row, the untimed step included; total_tokens_M counts them all."""
    _, result, values = clocked
    (trained,) = printed(result.stdout, "trained")
    assert trained == [(1, SEQ_LEN)] * 2 * STEPS
    assert values["total_tokens_M"] == f"{STEPS * TOKENS_PER_STEP / 1e6:.1f}"


def expected_flops_per_token(width=128, heads=1, vocab=8192, seq=SEQ_LEN):
    """FLOPs per token by hand for one layer: 6 x (lm_head, q k v proj, MLP, value-embedding gate)
    + 12 x heads x head_dim x window (the only layer is the last: full context)."""
    params = vocab * width + 4 * width * width + 2 * width * 4 * width + 32 * heads
    return 6 * params + 12 * heads * (width // heads) * seq


def test_mfu_is_model_flops_over_time_and_peak(clocked):
    """mfu_percent = flops/token x tokens of the timed steps / timed seconds / peak; the status line
    shows each step's own: flops/token x tokens/s / peak."""
    _, result, values = clocked
    flops = expected_flops_per_token()
    assert f"{flops / 1e6:.0f} MFLOP/token" in result.stdout
    assert values["mfu_percent"] == f"{100 * flops * TOKENS_PER_STEP * (STEPS - 1) / 1.0 / FAKE_PEAK:.2f}"
    per_step = f"{100 * flops * TOKENS_PER_STEP / STEP_SECONDS / FAKE_PEAK:.1f}%"
    assert [mfu for *_, mfu in status_lines(result.stdout)] == [per_step] * STEPS


# ---------------------------------------------------------------------------
# A run on the real clock, in one micro-batch of two rows a step


@pytest.fixture(scope="module")
def timed(tiny_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("timed")
    path = train_copy(folder, device_batch=2, edits=[SAVE_FIRST_GRADIENT_AND_PRINT_GROUPS])
    result = run(path, tiny_cache, budget=2)
    return folder, result, summary(result)


def test_training_seconds_add_up_the_timed_steps(timed):
    """training_seconds is the sum of the step times after the untimed first one; it reaches the
    budget and the run stops at the first step that does so; total_seconds holds it and more."""
    _, result, values = timed
    steps = status_lines(result.stdout)
    timed_ms = [ms for step, ms, _ in steps if step >= 1]
    training = float(values["training_seconds"])
    # printed to 0.1 s and 1 ms
    assert training == pytest.approx(sum(timed_ms) / 1000, abs=0.05 + 0.0005 * len(timed_ms))
    assert training >= 2.0 and (sum(timed_ms[:-1]) - 0.0005 * len(timed_ms)) / 1000 < 2.0
    assert training + steps[0][1] / 1000 < float(values["total_seconds"]) <= result.wall_seconds
    assert values["num_steps"] == str(len(steps)) and values["mfu_percent"] == "n/a"  # no peak FLOPs on a CPU


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(clocked, timed):
    """The first step's gradient from two micro-batches of one row (the clocked run) equals the
    one from a single micro-batch of the same two rows (this run): same seed, same data."""
    accumulated, whole = first_gradient(clocked[0]), first_gradient(timed[0])
    assert accumulated.keys() == whole.keys()
    scale = max(g.abs().max().item() for g in whole.values())
    for name, g in whole.items():
        assert torch.allclose(accumulated[name], g, rtol=1e-4, atol=1e-6 * scale), name


# ---------------------------------------------------------------------------
# Failures: out of memory, a bad loss

def oom_after(forwards):
    """An edit that raises torch.OutOfMemoryError in every training forward of two rows once
    `forwards` of them have run (the CPU cannot run out of memory on request)."""
    return (
        "optimizer = build_optimizer(model, compile_math=use_compile)\n",
        "optimizer = build_optimizer(model, compile_math=use_compile)\n"
        "trained = []  # test: the input shape of every training forward\n\n\n"
        "def forced_oom(module, args):\n"
        f"    if module.training and args[0].size(0) == 2 and len(trained) >= {forwards}:\n"
        '        raise torch.OutOfMemoryError("test: forced out of memory")\n'
        "    if module.training:\n"
        "        trained.append(tuple(args[0].shape))\n\n\n"
        "model.register_forward_pre_hook(forced_oom)\n",
    )


def test_out_of_memory_in_the_first_step_retries_at_half_the_batch(tiny_cache, tmp_path):
    path = train_copy(tmp_path, device_batch=2, edits=[oom_after(0)], tail=PRINT_TRAINED)
    result = run(path, tiny_cache, budget=1)
    values = summary(result)
    assert "out of memory in the first step: retrying with DEVICE_BATCH_SIZE=1 (2 micro-steps)" in result.stdout
    (trained,) = printed(result.stdout, "trained")
    steps = int(values["num_steps"])
    assert trained == [(1, SEQ_LEN)] * 2 * steps  # the same tokens a step, in twice the micro-steps
    assert values["total_tokens_M"] == f"{steps * TOKENS_PER_STEP / 1e6:.1f}"


def test_out_of_memory_after_the_first_step_is_a_one_line_failure(tiny_cache, tmp_path):
    result = run(train_copy(tmp_path, device_batch=2, edits=[oom_after(1)]), tiny_cache, budget=1)
    assert result.returncode == 1 and "\n---\n" not in result.stdout
    failure = "FAIL: out of memory at DEVICE_BATCH_SIZE=2: make the model or batch smaller"
    assert result.stderr.strip().splitlines() == [failure]


# The loss check must stop a run at its first bad step. The budget is 10 s, so a run whose check is
# gone ends normally (exit 0) in seconds and fails the test then, well inside the 60 s timeout. The
# loss is made bad by an edit: the soft cap bounds the real one (below ~40 nats with 8192 tokens),
# and a real divergence reaches NaN only through Muon's weight decay at a huge learning rate.
@pytest.mark.parametrize("change, bad", [(" * float('nan')", "nan"), (" + 1000", "above 100")],
                         ids=["nan", "above 100"])
def test_a_bad_loss_fails_at_once(tiny_cache, tmp_path, change, bad):
    edit = ("            loss = run_model(x, y)\n", f"            loss = run_model(x, y){change}  # test: {bad}\n")
    result = run(train_copy(tmp_path, device_batch=2, edits=[edit]), tiny_cache, budget=10, timeout=60)
    assert result.returncode == 1 and "\n---\n" not in result.stdout, result.stdout[-2000:]
    loss, step = re.search(r"\nFAIL: loss is (\S+) at step (\d+)\n", result.stdout).groups()
    assert step == "0" and (loss == "nan" if bad == "nan" else 1000 < float(loss) < 1100)
