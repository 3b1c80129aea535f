"""Copies of train.py with another MLP activation or loss, made the way program.md tells the agent
to (tests/formula_variants.py holds the edits and says what each is), for timing on a GPU.

    uv run benchmarks/variants.py OUT_DIR            # OUT_DIR/train_<name>.py for every variant, and prepare.py
    uv run benchmarks/bench_train.py --budget 30 train.py OUT_DIR/train_gelu.py OUT_DIR/train_gelu_plain.py
"""

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from formula_variants import VARIANTS, variant_source  # noqa: E402


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    source = open(os.path.join(ROOT, "train.py")).read()
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "prepare.py"), out)  # each copy imports prepare from its own folder
    for name in VARIANTS:
        path = os.path.join(out, f"train_{name}.py")
        with open(path, "w") as f:
            f.write(variant_source(name, source))
        print(path)


if __name__ == "__main__":
    main()
