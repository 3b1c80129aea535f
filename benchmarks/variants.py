"""Copies of train.py with another MLP activation or loss, made the way program.md tells the agent
to: each formula edited in PyTorch and, for the fused variants, in its Triton tile function beside
it. The plain variants edit the PyTorch formula only, so the start-up check refuses the kernel and
the run uses the formula in PyTorch (its header says `plain (fused kernel disagrees ...)`).

    uv run benchmarks/variants.py OUT_DIR            # OUT_DIR/train_<name>.py for every variant, and prepare.py
    uv run benchmarks/bench_train.py --budget 30 train.py OUT_DIR/train_gelu.py OUT_DIR/train_gelu_plain.py

The edits are exact string replacements: if train.py changed, this fails loudly (a test checks
that they apply and that the fused variants pass the start-up check).
"""

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RELU2 = '''def activation(h):  # the MLP's nonlinearity: ReLU²
    return torch.relu(h).square()
'''
GELU = '''def activation(h):  # the MLP's nonlinearity: GELU (tanh approximation)
    return F.gelu(h, approximate="tanh")
'''
RELU2_TILES = '''@triton_jit
def activation_tile(h):
    r = tl.maximum(h, 0.0)
    return r * r


@triton_jit
def activation_grad_tile(y):  # d activation / dh, here from the output: relu(h) = sqrt(relu(h)²)
    return 2.0 * tl.sqrt(y)


ACTIVATION_GRAD_FROM_OUTPUT = True'''
GELU_TILES = '''@triton_jit
def activation_tile(h):
    t = 1.0 - 2.0 / (tl.exp(2.0 * 0.7978845608028654 * (h + 0.044715 * h * h * h)) + 1.0)  # tanh
    return 0.5 * h * (1.0 + t)


@triton_jit
def activation_grad_tile(h):  # d activation / dh, from the input h
    t = 1.0 - 2.0 / (tl.exp(2.0 * 0.7978845608028654 * (h + 0.044715 * h * h * h)) + 1.0)
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)


ACTIVATION_GRAD_FROM_OUTPUT = False'''
RELU = '''def activation(h):  # the MLP's nonlinearity: ReLU
    return torch.relu(h)
'''
RELU_TILES = '''@triton_jit
def activation_tile(h):
    return tl.maximum(h, 0.0)


@triton_jit
def activation_grad_tile(y):  # d activation / dh, from the output
    return tl.where(y > 0.0, 1.0, 0.0)


ACTIVATION_GRAD_FROM_OUTPUT = True'''
CE = '''    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="none")
'''
Z_LOSS = '''    losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="none")
    return losses + 1e-4 * torch.logsumexp(logits, -1).flatten().square() * (targets.flatten() != -1)  # z-loss
'''
CE_TILES = '''def token_loss_tile(lse, target_logit):  # from the log-sum-exp of the token's capped logits
    return lse - target_logit


@triton_jit
def token_loss_grad_tile(probs, is_target, lse):  # d loss / d capped logits; probs = their softmax
    return probs - is_target'''
Z_LOSS_TILES = '''def token_loss_tile(lse, target_logit):  # from the log-sum-exp of the token's capped logits
    return lse - target_logit + 1e-4 * lse * lse


@triton_jit
def token_loss_grad_tile(probs, is_target, lse):  # d loss / d capped logits; probs = their softmax
    return probs * (1.0 + 2e-4 * lse) - is_target'''

VARIANTS = {
    "gelu": [(RELU2, GELU), (RELU2_TILES, GELU_TILES)],
    "gelu_plain": [(RELU2, GELU)],
    "relu": [(RELU2, RELU), (RELU2_TILES, RELU_TILES)],
    "relu_plain": [(RELU2, RELU)],
    "zloss": [(CE, Z_LOSS), (CE_TILES, Z_LOSS_TILES)],
    "zloss_plain": [(CE, Z_LOSS)],
}


def variant_source(name, source):
    for old, new in VARIANTS[name]:
        assert source.count(old) == 1, f"train.py changed: {old.splitlines()[0]!r} not found once"
        source = source.replace(old, new)
    return source


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
