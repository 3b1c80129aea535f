"""train.py's loss alone, compiled, forward + backward at a 64-sequence micro-step's shapes (64 x 2048 tokens,
width 512, vocabulary 8192, bf16 autocast, float32 lm_head weight, mean over tokens as in
training): train.py's token_losses formula in plain PyTorch (lm_head, soft cap, cross-entropy)
against its fused Triton kernel, with the lm_head matmuls alone for scale, the memory each keeps
for the backward, the forward alone without gradients (evaluation), and how far each one's loss
and gradients are from float64 (on 16 x 2048 tokens). Needs a CUDA GPU.

    uv run benchmarks/bench_loss.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from train_source import load_definitions  # noqa: E402
from timing import cuda_ms  # noqa: E402

tr = load_definitions()
N, C, V = 64 * 2048, 512, 8192

g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(N, C, device="cuda", generator=g).bfloat16()
w_head = torch.randn(V, C, device="cuda", generator=g) * 0.05  # logits of a few units, some past the cap
targets = torch.randint(0, V, (N,), device="cuda", generator=g)


def matmuls_alone():
    a, b = x, w_head.bfloat16()
    dlogits = torch.randn(N, V, device="cuda", generator=g).bfloat16()
    return cuda_ms(lambda: (a @ b.T, dlogits @ b, dlogits.T @ a))


print(f"lm_head's three cuBLAS matmuls alone (forward, d x, d w): {matmuls_alone():.3f} ms")


def mean_loss(fn, x, w_head, targets):
    return fn(x, w_head, targets).mean()


n = 16 * 2048
leaves = [x[:n].double().requires_grad_(), w_head.double().requires_grad_()]
loss = mean_loss(tr.token_losses, *leaves, targets[:n])
reference = [loss, *torch.autograd.grad(loss, leaves)]
del loss

print(f"{'loss':<8} {'fwd+bwd ms':>10} {'no-grad fwd ms':>14} {'kept MB':>8}  relative error against float64: loss, dx, dw")
for name, fn in (("plain", tr.token_losses), ("fused", tr.fused_token_losses)):
    compiled = torch.compile(mean_loss, dynamic=False)

    def forward(x, w, t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return compiled(fn, x, w, t)

    leaves = [x[:n].clone().requires_grad_(), w_head.clone().requires_grad_()]
    loss = forward(*leaves, targets[:n])
    got = [loss, *torch.autograd.grad(loss, leaves)]
    errors = [((a.double() - r).norm() / r.norm()).item() for a, r in zip(got, reference)]
    leaves = [x.clone().requires_grad_(), w_head.clone().requires_grad_()]
    ms = cuda_ms(lambda: torch.autograd.grad(forward(*leaves, targets), leaves))
    with torch.no_grad():
        eval_ms = cuda_ms(lambda: forward(*leaves, targets))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss = forward(*leaves, targets)  # what the forward keeps alive for the backward
    kept = (torch.cuda.memory_allocated() - before) / 1e6
    del loss
    print(f"{name:<8} {ms:10.3f} {eval_ms:14.3f} {kept:8.0f}  " + ", ".join(f"{e:.2e}" for e in errors))
