"""Throughput of train.py on this machine's GPU: one command, one table.

    uv run benchmarks/bench_train.py                        # train.py, 60 s of timed training
    uv run benchmarks/bench_train.py --budget 300 a.py b.py # compare variants side by side

Each variant runs as a real `train.py` process (AUTORESEARCH_TIME_BUDGET shortens the timed
training; everything else is as in an experiment) and its log is parsed: median step time and
tokens/s over the timed steps, MFU, peak memory, and the time spent outside timed training
(start-up, compilation, the untimed first steps, evaluation). Run the variants in one call on one
machine: figures from different machines or runs do not compare. Logs go to --logs.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser()
parser.add_argument("scripts", nargs="*", default=[os.path.join(ROOT, "train.py")])
parser.add_argument("--budget", type=int, default=60, help="seconds of timed training per run")
parser.add_argument("--logs", default=".", help="folder for each run's log")
args = parser.parse_args()

rows = []
for i, script in enumerate(map(os.path.abspath, args.scripts)):
    env = dict(os.environ, AUTORESEARCH_TIME_BUDGET=str(args.budget), PYTHONUNBUFFERED="1")
    name = os.path.join(os.path.basename(os.path.dirname(script)), os.path.basename(script))  # folder/train.py
    log_path = os.path.join(args.logs, f"bench-{i}-{name.replace(os.sep, '-')}.log")
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, script], cwd=os.path.dirname(script), env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    text = open(log_path).read().replace("\r", "\n")
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", text, re.M))
    steps = [(int(s), float(ms)) for s, ms in re.findall(r"^step (\d+) .*?\| (\d+) ms \|", text, re.M)]
    timed = [ms for s, ms in steps if s > 10]
    batch = re.search(r"^batch: ([\d,]+) tokens", text, re.M)
    if rc != 0 or "val_bpb" not in summary or not timed or not batch:
        rows.append((name, f"FAILED (exit {rc}), see {log_path}"))
        continue
    step_ms = statistics.median(timed)
    tokens = int(batch.group(1).replace(",", ""))
    overhead = float(summary["total_seconds"]) - float(summary["training_seconds"])
    rows.append((name, f"{tokens / step_ms * 1e3 / 1e6:>8.3f}M {summary['mfu_percent']:>7} {step_ms:>8.1f} {float(summary['peak_vram_mb']) / 1024:>8.1f} {overhead:>9.1f} {summary['val_bpb']:>10} {summary['num_steps']:>6}"))

print(f"\n{'variant':<28}{'tokens/s':>9} {'MFU %':>7} {'step ms':>8} {'peak GB':>8} {'outside s':>9} {'val_bpb':>10} {'steps':>6}")
for name, row in rows:
    print(f"{name:<28}{row}")
