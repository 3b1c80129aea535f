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
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402


_LOADED = []


def load_train_definitions(path=os.path.join(ROOT, "train.py")):
    """train.py is a flat script; its definitions are everything above the Setup section."""
    source = open(path).read()
    head = source.split("\n# Setup")[0]
    assert len(head) < len(source), "train.py lost its '# Setup' section marker"
    module = types.ModuleType("train_definitions")
    module.__file__ = path
    sys.modules[module.__name__] = module  # torch.compile looks classes up by their module's name
    exec(compile(head, path, "exec"), module.__dict__)
    # Each load registers train.py's custom ops again under the same names (the latest wins), and a
    # collected module would take its registration with it, pulling the ops from under the others.
    _LOADED.append(module)
    return module


def train_config(tr, seq_len, vocab_size, fused=()):
    """train.py's GPTConfig from its hyperparameters, as its Setup section builds it; fused names the
    fused kernels to use ('mlp', 'loss')."""
    dim = -(-tr.DEPTH * tr.ASPECT_RATIO // tr.HEAD_DIM) * tr.HEAD_DIM
    return tr.GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=tr.DEPTH, n_head=dim // tr.HEAD_DIM,
                        n_kv_head=dim // tr.HEAD_DIM, n_embd=dim, window_pattern=tr.WINDOW_PATTERN,
                        fused_mlp="mlp" in fused, fused_loss="loss" in fused)


def training_losses(attention, batches, config, device, compile, path=os.path.join(ROOT, "train.py")):
    """Per-step losses of train.py's GPT and MuonAdamW (constant learning rates) on the given
    batches, with `attention` as the model's attention and the fused kernels that config names.
    Same seed every call."""
    tr = load_train_definitions(path)  # a fresh copy: its own globals and compiled code
    torch.manual_seed(0)
    with torch.device(device):
        model = tr.GPT(config, attention)
    model.init_weights()
    if device.type == "cuda":  # as train.py does
        model.transformer.wte.to(torch.bfloat16)
        model.value_embeds.to(torch.bfloat16)
    optimizer = tr.build_optimizer(model, compile_math=compile)
    run_model = torch.compile(model, dynamic=False) if compile else model
    losses = []
    for x, y in batches:
        with prepare.autocast(device):
            loss = run_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", help="attention backend (fa4, flex, sdpa) [/mlp] [/loss]; the first is the reference")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    args = parser.parse_args()
    device = prepare.get_device()
    seq_len, _, _ = prepare.run_settings(device)
    tokenizer = prepare.Tokenizer.from_directory()
    tr = load_train_definitions()
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
