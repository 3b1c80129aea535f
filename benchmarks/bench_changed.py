"""What an experiment that changes the model costs outside its training time: copies of train.py
with the edits an agent makes most (a window pattern, grouped-query attention, a wider or deeper
model, an MLP written in PyTorch), each run as a real process after the unchanged default, with
the caches the default left (as in a night: the baseline first, then one changed model after
another). Prints bench_train.py's table: wall clock, time outside training and its phases.

    uv run benchmarks/bench_changed.py                              # this train.py, 15 s budgets
    uv run benchmarks/bench_changed.py old/train.py train.py        # two versions side by side
    uv run benchmarks/bench_changed.py --only default,window_sl --budget 30

With several train.py files, each variant runs for each file in turn (old, new, old, new, ...),
so that both see the same machine. Each file's copies sit beside a copy of the prepare.py of its
folder, which they import. Needs `uv run prepare.py`'s cache; a GPU for figures worth reading.
"""

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from bench_train import print_table, run  # noqa: E402
from formula_variants import VARIANTS  # noqa: E402
from train_source import edit_code, replace_definitions  # noqa: E402

SWIGLU = '''
class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = (8 * config.n_embd // 3 + 127) // 128 * 128  # the parameters of a 4x MLP, in three matrices
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=False)  # gate and value, one matmul
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        gate, value = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * value)
'''
EDITS = {  # name: the copy of train.py's source
    "default": lambda s: s,
    "window_sl": lambda s: edit_code(s, 'WINDOW_PATTERN = "SSSL"\n', 'WINDOW_PATTERN = "SL"\n'),
    "one_kv_head": lambda s: edit_code(s, "n_kv_head=model_dim // HEAD_DIM", "n_kv_head=1"),
    "width_768": lambda s: edit_code(s, "ASPECT_RATIO = 64\n", "ASPECT_RATIO = 96\n"),
    "depth_10": lambda s: edit_code(s, "DEPTH = 8\n", "DEPTH = 10\n"),
    "gelu_written_out": lambda s: replace_definitions(s, VARIANTS["gelu_plain"]),
    "swiglu_written_out": lambda s: replace_definitions(s, SWIGLU),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scripts", nargs="*", default=[os.path.join(ROOT, "train.py")])
    parser.add_argument("--only", default=",".join(EDITS), help="variants to run, comma-separated, in this order")
    parser.add_argument("--budget", type=int, default=15, help="seconds of timed training per run")
    parser.add_argument("--logs", default="bench-changed", help="folder for the copies and each run's log")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = sorted(set(names) - set(EDITS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(EDITS)}")
    copies = {}
    for i, script in enumerate(map(os.path.abspath, args.scripts)):
        folder = os.path.join(os.path.abspath(args.logs), f"version{i}")
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(os.path.dirname(script), "prepare.py"), folder)
        source = open(script).read()
        for name in names:
            copies[i, name] = os.path.join(folder, f"train_{name}.py")
            with open(copies[i, name], "w") as f:
                f.write(EDITS[name](source))
    rows = []
    for name in names:  # a name given twice runs twice: a second, warm run of the same copy
        for i in range(len(args.scripts)):
            label = f"version{i} {name}"
            log = os.path.join(args.logs, f"{len(rows)}-{label.replace(' ', '-')}.log")
            rows.append((label, run(copies[i, name], args.budget, log)))
            print(f"{label}: {rows[-1][1]}", flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
