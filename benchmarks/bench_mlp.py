"""train.py's MLP alone, compiled, forward + backward at a 64-sequence micro-step's shapes (64 x 2048 tokens,
width 512, hidden 2048, bf16 autocast, float32 weights): train.py's mlp formula in plain PyTorch
against its fused Triton kernel, with cuBLAS's matmul alone for scale, the extra
memory each keeps for the backward, and how far each one's output and gradients are from float64.
Then each fused kernel alone (the forward's matmul with the activation in its epilogue, the backward's
with its derivative), with its registers and spills. Give copies of train.py to compare them
(benchmarks/variants.py makes some). Needs a CUDA GPU.

    uv run benchmarks/bench_mlp.py [train.py other_train.py ...]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from train_source import load_definitions  # noqa: E402
from timing import cuda_ms  # noqa: E402

B, T, C, H = 64, 2048, 512, 2048

g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(B, T, C, device="cuda", generator=g).bfloat16()
dout = torch.randn(B, T, C, device="cuda", generator=g).bfloat16() * 0.01
w_fc = (torch.rand(H, C, device="cuda", generator=g) * 2 - 1) * (3 / C) ** 0.5  # train.py's init
w_proj = torch.randn(C, H, device="cuda", generator=g) * 0.02  # (train.py starts it at zero)

a, b = x.view(-1, C), w_fc.bfloat16()
ms = cuda_ms(lambda: a @ b.T)
print(f"cuBLAS matmul alone ({B * T} x {C} @ {C} x {H}): {ms:.3f} ms, {2 * B * T * C * H / ms / 1e9:.0f} TFLOP/s")


def kernels_alone(tr):
    """The fused MLP's two Triton launches alone: ms and TFLOP/s of each, registers and spills."""
    saved = tr.mlp_matmul(a, b.T)[1]
    fwd = cuda_ms(lambda: tr.mlp_matmul(a, b.T))
    bwd = cuda_ms(lambda: tr.mlp_matmul(dout.view(-1, C), w_proj.bfloat16(), saved))
    compiled = [k for cache in tr.mlp_matmul_kernel.device_caches.values() for k in cache[0].values()]
    regs = ", ".join(f"{k.n_regs} regs {k.n_spills} spills" for k in compiled)
    flop = 2 * B * T * C * H / 1e9
    return f"kernels alone: forward {fwd:.3f} ms ({flop / fwd:.0f} TFLOP/s), backward {bwd:.3f} ms ({flop / bwd:.0f}); {regs}"


paths = sys.argv[1:] or [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")]
print(f"{'MLP':<24} {'fwd+bwd ms':>10} {'kept MB':>8}  relative error against float64: out, dx, dw_fc, dw_proj")
for path in paths:
    tr = load_definitions(os.path.abspath(path))
    leaves = [t.double().requires_grad_() for t in (x, w_fc, w_proj)]
    out = tr.mlp(*leaves)
    reference = [out, *torch.autograd.grad(out, leaves, dout.double())]
    for name, fn in (("plain", tr.mlp), ("fused", tr.fused_mlp)):
        name = f"{os.path.basename(path)} {name}"
        compiled = torch.compile(fn, dynamic=False)
        leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]

        def forward():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return compiled(*leaves)

        def step():
            return torch.autograd.grad(forward(), leaves, dout)

        grads = step()
        out = forward()
        errors = [((got.double() - ref).norm() / ref.norm()).item() for got, ref in zip([out, *grads], reference)]
        del out
        ms = cuda_ms(step)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = forward()  # what the forward keeps alive for the backward, the output included
        kept = (torch.cuda.memory_allocated() - before) / 1e6
        del out
        print(f"{name:<24} {ms:10.3f} {kept:8.0f}  " + ", ".join(f"{e:.2e}" for e in errors))
    print("    " + kernels_alone(tr))
