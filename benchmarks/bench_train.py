"""Throughput and time outside training of train.py on this machine's GPU: one command, one table.

    uv run benchmarks/bench_train.py                        # train.py, 60 s of timed training
    uv run benchmarks/bench_train.py --budget 300 a.py b.py # compare variants side by side

Each variant runs as a real `train.py` process (AUTORESEARCH_TIME_BUDGET shortens the timed
training; everything else is as in an experiment) and its log is parsed: median step time and
tokens/s over the timed steps, MFU, peak memory, and the seconds outside timed training (the
process's wall clock minus training_seconds), split as the run prints them: start-up, step 0
(mostly compilation), evaluation, and the rest (the untimed steps 1-10, imports before the clock
starts, exit). Run the variants in one call on one machine: figures from different machines or
runs do not compare. Logs go to --logs.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["tokens/s", "MFU %", "step ms", "peak GB", "wall s", "outside", "start-up", "step 0", "eval", "rest",
           "val_bpb", "steps"]


def run(script, budget, log_path):
    """One train.py process; its figures as {column: text}, or {'error': why}."""
    env = dict(os.environ, AUTORESEARCH_TIME_BUDGET=str(budget), PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, script], cwd=os.path.dirname(script), env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    text = open(log_path).read().replace("\r", "\n")
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", text, re.M))
    steps = [(int(s), float(ms)) for s, ms in re.findall(r"^step (\d+) .*?\| (\d+) ms \|", text, re.M)]
    timed = [ms for s, ms in steps if s > 10] or [ms for s, ms in steps if s > 0]  # GPU: 11 untimed steps; CPU: 1
    batch = re.search(r"^batch: ([\d,]+) tokens", text, re.M)
    phases = r"^time outside training: start-up ([\d.]+)s, step 0 ([\d.]+)s, evaluation ([\d.]+)s"
    phases = re.search(phases, text, re.M)
    if rc != 0 or "val_bpb" not in summary or not timed or not batch or not phases:
        return {"error": f"FAILED (exit {rc}), see {log_path}"}
    step_ms = statistics.median(timed)
    outside = wall - float(summary["training_seconds"])
    startup, step0, evaluation = (float(v) for v in phases.groups())
    figures = [f"{int(batch.group(1).replace(',', '')) / step_ms * 1e3 / 1e6:.3f}M", summary["mfu_percent"],
               f"{step_ms:.1f}", f"{float(summary['peak_vram_mb']) / 1024:.1f}", f"{wall:.1f}", f"{outside:.1f}",
               f"{startup:.1f}", f"{step0:.1f}", f"{evaluation:.1f}", f"{outside - startup - step0 - evaluation:.1f}",
               summary["val_bpb"], summary["num_steps"]]
    return dict(zip(COLUMNS, figures))


def print_table(rows):
    print(f"\n{'variant':<34}" + "".join(f"{c:>10}" for c in COLUMNS))
    for name, figures in rows:
        cells = figures["error"] if "error" in figures else "".join(f"{figures[c]:>10}" for c in COLUMNS)
        print(f"{name:<34}{cells}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scripts", nargs="*", default=[os.path.join(ROOT, "train.py")])
    parser.add_argument("--budget", type=int, default=60, help="seconds of timed training per run")
    parser.add_argument("--logs", default=".", help="folder for each run's log")
    args = parser.parse_args()
    rows = []
    for i, script in enumerate(map(os.path.abspath, args.scripts)):
        name = os.path.join(os.path.basename(os.path.dirname(script)), os.path.basename(script))  # folder/train.py
        log = os.path.join(args.logs, f"bench-{i}-{name.replace(os.sep, '-')}.log")
        rows.append((name, run(script, args.budget, log)))
        print(f"{name}: {rows[-1][1]}", flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
