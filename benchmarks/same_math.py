"""Same mathematics: train.py's model and optimizer, trained from the same seed on the same batches
through two or more kernel paths; prints the per-step losses side by side.

    uv run benchmarks/same_math.py flex fa4               # on a GPU: a faster attention against another
    uv run benchmarks/same_math.py fa4 fa4/mlp fa4/mlp/loss --steps 20 --batch 16

Each variant is an attention backend (fa4, flex, sdpa), optionally followed by /mlp and /loss: the
fused kernels of train.py for the MLP and the loss (default: their plain PyTorch formulas). The
first variant is the reference; each other one is compared with it step by step. On a GPU the
model runs in bf16 under torch.compile exactly as in train.py, so two correct paths still drift
apart by bf16 rounding; compare the gaps with that of two plain attention backends (sdpa, flex).
Needs `uv run prepare.py` (tokenizer, shards).
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import prepare  # noqa: E402
from train_source import load_definitions, train_config, training_losses  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", help="attention backend (fa4, flex, sdpa) [/mlp] [/loss]; the first is the reference")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    args = parser.parse_args()
    device = prepare.get_device()
    seq_len, _, _ = prepare.run_settings(device)
    tokenizer = prepare.Tokenizer.from_directory()
    tr = load_definitions()
    loader = prepare.make_dataloader(tokenizer, args.batch, seq_len, "train")
    batches = [next(loader)[:2] for _ in range(args.steps)]
    runs = {}
    for name in args.variants:
        attention, *fused = name.split("/")
        config = train_config(tr, seq_len, tokenizer.get_vocab_size(), fused)
        runs[name] = training_losses(prepare.make_attention(attention, device, seq_len), batches, config, device, device.type == "cuda")
    names = args.variants
    ref = names[0]
    print(f"{'step':>4} " + " ".join(f"{n:>11}" for n in names) + "".join(f" {'|' + n + ' - ' + ref + '|':>24}" for n in names[1:]))
    for i in range(args.steps):
        row = " ".join(f"{runs[n][i]:11.4f}" for n in names)
        print(f"{i:4d} {row}" + "".join(f" {abs(runs[n][i] - runs[ref][i]):24.4f}" for n in names[1:]))
    for n in names[1:]:
        gaps = [abs(a - b) for a, b in zip(runs[n], runs[ref])]
        print(f"{n} vs {ref}: max |loss gap| {max(gaps):.4f} over {args.steps} steps, mean {sum(gaps) / len(gaps):.4f}")


if __name__ == "__main__":
    main()
