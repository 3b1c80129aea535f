"""Packed tokens per second of prepare.make_dataloader against a naive reading of its packing
(tests/naive_packing.py).

    uv run benchmarks/bench_loader.py [--batches 20] [--data DIR]

Needs a prepared cache (uv run prepare.py). Both loaders produce the same 128 x 2048 batches of
the training split; the first batches are checked to be identical, then each is timed over the
same number of batches. The real loader is timed twice: the first pass may still be tokenizing,
the second reads the token cache that prepare.py and earlier passes wrote.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import prepare  # noqa: E402
from naive_packing import naive_batches  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--batches", type=int, default=20)
parser.add_argument("--B", type=int, default=128)
parser.add_argument("--T", type=int, default=prepare.MAX_SEQ_LEN)
args = parser.parse_args()

tokenizer = prepare.Tokenizer.from_directory()
B, T, n = args.B, args.T, args.batches
tokens = n * B * T


def time_loader(make):
    loader = make()
    t0 = time.perf_counter()
    for _ in range(n):
        next(loader)
    return tokens / (time.perf_counter() - t0)


fast = prepare.make_dataloader(tokenizer, B, T, "train")
naive = naive_batches(tokenizer, prepare.list_shards("train"), B, T, 1000)
for _ in range(2):
    x, y, _ = next(fast)
    rows, _ = next(naive)
    assert np.array_equal(x.cpu().numpy(), np.array(rows)[:, :-1]), "loaders disagree"
print(f"first 2 batches identical; timing {n} batches of {B}x{T} ({tokens / 1e6:.1f}M tokens) each")
naive_rate = time_loader(lambda: naive_batches(tokenizer, prepare.list_shards("train"), B, T, 1000))
fast_rate = time_loader(lambda: prepare.make_dataloader(tokenizer, B, T, "train"))
print(f"{'loader':<28}{'tokens/s':>12}{'vs naive':>10}")
print(f"{'naive spec reading':<28}{naive_rate / 1e6:>11.2f}M{1:>9.1f}x")
print(f"{'make_dataloader':<28}{fast_rate / 1e6:>11.2f}M{fast_rate / naive_rate:>9.1f}x")
