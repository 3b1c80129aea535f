"""How much val_bpb moves between runs of one unchanged train.py, and why.

    uv run benchmarks/noise.py                           # 4 repeats + 2 other seeds, 60 s budgets
    uv run benchmarks/noise.py --repeats 6 --seeds 43 --budget 300

Runs train.py (unchanged) as real processes: `--repeats` times as it is, then once for each of
`--seeds`, where torch.manual_seed is given that seed instead (train.py's text is not touched: the
runs import torch with manual_seed wrapped). Prints each run's val_bpb, steps and tokens/s as it
ends, then the spread, split into its sources as far as the runs allow:
- step count: the timed budget gives runs different step counts; the training loss's slope over
  the last steps times the spread of step counts is the part of val_bpb's spread it explains;
- nondeterministic kernels: runs with one seed see the same batches in the same order, so their
  logged losses at the same step differ only by non-deterministic GPU arithmetic;
- seed: the other seeds change the initial weights.
Logs go to --logs. Run it on an idle GPU; compare figures within one call only.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py run as __main__ with every torch.manual_seed(s) call turned into manual_seed(SEED_OFFSET + s)
WRAPPER = """
import os, runpy, sys, torch
seed = torch.manual_seed
offset = int(os.environ["SEED_OFFSET"])
torch.manual_seed = lambda s: seed(s + offset)
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(script, budget, seed_offset, log_path):
    env = dict(os.environ, AUTORESEARCH_TIME_BUDGET=str(budget), PYTHONUNBUFFERED="1", SEED_OFFSET=str(seed_offset))
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, "-c", WRAPPER, script], cwd=os.path.dirname(script), env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    text = open(log_path).read().replace("\r", "\n")
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", text, re.M))
    status = r"^step (\d+) .*?\| loss ([\d.]+) .*?\| (\d+) ms"
    steps = {int(s): (float(loss), float(ms)) for s, loss, ms in re.findall(status, text, re.M)}
    if rc != 0 or "val_bpb" not in summary:
        return None
    timed_ms = [ms for s, (_, ms) in steps.items() if s > 10]
    batch = int(re.search(r"^batch: ([\d,]+) tokens", text, re.M).group(1).replace(",", ""))
    tokens_per_s = batch / statistics.median(timed_ms) * 1e3 if timed_ms else float("nan")
    return dict(val_bpb=float(summary["val_bpb"]), steps=int(summary["num_steps"]),
                losses={s: v[0] for s, v in steps.items()}, tokens_per_s=tokens_per_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default=os.path.join(ROOT, "train.py"))
    parser.add_argument("--repeats", type=int, default=4, help="runs with train.py's own seed")
    parser.add_argument("--seeds", type=int, nargs="*", default=[43, 44], help="one run with each of these seeds")
    parser.add_argument("--budget", type=int, default=60, help="seconds of timed training per run")
    parser.add_argument("--logs", default=".", help="folder for each run's log")
    args = parser.parse_args()
    script = os.path.abspath(args.script)
    plan = [("repeat", 0)] * args.repeats + [(f"seed {s}", s - 42) for s in args.seeds]
    runs = []
    print(f"{'run':<10}{'val_bpb':>10}{'steps':>7}{'tokens/s':>11}", flush=True)
    for i, (name, offset) in enumerate(plan):
        r = run(script, args.budget, offset, os.path.join(args.logs, f"noise-{i}-{name.replace(' ', '')}.log"))
        figures = f"{r['val_bpb']:>10.6f}{r['steps']:>7}{r['tokens_per_s'] / 1e6:>10.3f}M" if r else "  FAILED"
        print(f"{name:<10}{figures}", flush=True)
        if r:
            runs.append((name, r))
    same = [r for name, r in runs if name == "repeat"]
    if len(same) >= 2:
        bpb = [r["val_bpb"] for r in same]
        steps = [r["steps"] for r in same]
        print(f"\nrepeats (one seed, n={len(same)}): val_bpb mean {statistics.mean(bpb):.6f}, "
              f"sd {statistics.stdev(bpb):.6f}, range {max(bpb) - min(bpb):.6f}; steps {min(steps)}-{max(steps)}")
        step_count_part(same)
        # nondeterminism: the same step of the same seed sees the same batches
        common = min(r["steps"] for r in same)
        for s in [10, 50, common - 1]:
            values = [r["losses"].get(s) for r in same]
            if None not in values:
                spread = max(values) - min(values)
                print(f"nondeterminism: smoothed loss at step {s}: spread {spread:.4f} nats over {len(values)} runs")
    per_seed = [r["val_bpb"] for r in same[:1]] + [r["val_bpb"] for name, r in runs if name != "repeat"]
    if len(per_seed) >= 2:
        print(f"seeds (n={len(per_seed)}, one run each): val_bpb sd {statistics.stdev(per_seed):.6f}")


def step_count_part(same):
    """The part of the repeats' spread that their different step counts explain, to first order: the
    smoothed training loss's slope over the last steps times the sd of the step counts."""
    first, common = same[0]["losses"], min(r["steps"] for r in same)
    lo, hi = max(11, common - 41), common - 1
    if hi - lo >= 10 and lo in first and hi in first:
        slope = (first[hi] - first[lo]) / (hi - lo)  # nats per step
        step_sd = statistics.stdev([r["steps"] for r in same])
        per_nat = same[0]["val_bpb"] / first[hi]  # val_bpb is the loss in nats over a constant (ln 2 x bytes a token)
        print(f"step count: sd {step_sd:.2f} steps x loss slope {slope:.2e} nats/step "
              f"= {abs(slope) * step_sd * per_nat:.6f} val_bpb")

if __name__ == "__main__":
    main()
