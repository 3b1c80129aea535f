"""Copies of train.py's formulas changed the way program.md tells the agent to: a formula edited in
PyTorch and, for the fused variants, in its Triton tile function beside it. The plain variants edit
the PyTorch formula only, so the start-up check refuses the kernel and the run uses the formula
(its header says `plain (fused kernel disagrees ...)`). The tests check that; benchmarks/variants.py
writes the copies for timing them on a GPU."""

from train_source import replace_definitions

GELU = '''
def activation(h):  # the MLP's nonlinearity: GELU (tanh approximation)
    return F.gelu(h, approximate="tanh")
'''
GELU_TILES = '''
@triton_jit
def activation_tile(h):
    t = 1.0 - 2.0 / (tl.exp(2.0 * 0.7978845608028654 * (h + 0.044715 * h * h * h)) + 1.0)  # tanh
    return 0.5 * h * (1.0 + t)


@triton_jit
def activation_grad_tile(h):  # d activation / dh, from the input h
    t = 1.0 - 2.0 / (tl.exp(2.0 * 0.7978845608028654 * (h + 0.044715 * h * h * h)) + 1.0)
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)


ACTIVATION_GRAD_FROM_OUTPUT = False
'''
RELU = '''
def activation(h):  # the MLP's nonlinearity: ReLU
    return torch.relu(h)
'''
RELU_TILES = '''
@triton_jit
def activation_tile(h):
    return tl.maximum(h, 0.0)


@triton_jit
def activation_grad_tile(y):  # d activation / dh, from the output
    return tl.where(y > 0.0, 1.0, 0.0)
'''
Z_LOSS = '''
def token_losses(x, w_head, targets):
    """Each token's loss: cross-entropy of the soft-capped logits, plus a z-loss on their log-sum-exp."""
    logits = softcap(F.linear(x, w_head).float())
    losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="none")
    return losses + 1e-4 * torch.logsumexp(logits, -1).flatten().square() * (targets.flatten() != -1)
'''
Z_LOSS_TILES = '''
@triton_jit
def token_loss_tile(lse, target_logit):  # from the log-sum-exp of the token's capped logits
    return lse - target_logit + 1e-4 * lse * lse


@triton_jit
def token_loss_grad_tile(probs, is_target, lse):  # d loss / d capped logits; probs = their softmax
    return probs * (1.0 + 2e-4 * lse) - is_target
'''

VARIANTS = {
    "gelu": GELU + GELU_TILES,
    "gelu_plain": GELU,
    "relu": RELU + RELU_TILES,
    "relu_plain": RELU,
    "zloss": Z_LOSS + Z_LOSS_TILES,
    "zloss_plain": Z_LOSS,
}


def variant_source(name, source):
    return replace_definitions(source, VARIANTS[name])
