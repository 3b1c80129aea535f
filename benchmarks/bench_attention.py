"""Attention kernels alone at the training shapes: forward + backward time and error against
float32 math, for each backend given (default: fa4 flex). Needs a CUDA GPU.

    uv run benchmarks/bench_attention.py                 # flash-attn-4 against compiled FlexAttention
    uv run benchmarks/bench_attention.py fa4 flex sdpa --batch 64

FlexAttention is timed compiled, as train.py runs it. Before timing, the flash-attn-4 op goes
through torch.library.opcheck (its fake and autograd rule against the real kernel).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("backends", nargs="*", default=["fa4", "flex"])
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--seq-len", type=int, default=2048)
args = parser.parse_args()
device = torch.device("cuda")
B, T, H, D = args.batch, args.seq_len, args.heads, 128

fns = {}
for name in args.backends:
    t0 = time.time()
    fn = prepare.make_attention(name, device, T)
    fns[name] = torch.compile(fn) if name == "flex" else fn
    print(f"{name}: ready in {time.time() - t0:.1f}s")
reference = prepare.make_attention("sdpa", device, T)

g = torch.Generator(device=device).manual_seed(0)
q, k, v, dout = (torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4))
q, k, v = (t.requires_grad_() for t in (q, k, v))
if "fa4" in fns:
    small = [t[:2].detach().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.autoresearch.fa4_fwd.default, (*small, T // 2))
    print("fa4: torch.library.opcheck passed")


def forward_backward(fn, q, k, v, dout, window):
    out = fn(q, k, v, window)
    return [out, *torch.autograd.grad(out, (q, k, v), dout)]


print(f"\n{'backend':<8}{'window':>7}{'fwd+bwd ms':>12}   relative error vs float32 (out, dq, dk, dv)")
for window in (T // 2, T):
    exact = forward_backward(reference, *[t[:2].detach().float().requires_grad_() for t in (q, k, v)], dout[:2].float(), window)
    for name, fn in fns.items():
        got = forward_backward(fn, *[t[:2].detach().requires_grad_() for t in (q, k, v)], dout[:2], window)
        errors = " ".join(f"{((a.float() - b).norm() / b.norm()).item():.1e}" for a, b in zip(got, exact))
        for _ in range(3):
            forward_backward(fn, q, k, v, dout, window)
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(20):
            forward_backward(fn, q, k, v, dout, window)
        torch.cuda.synchronize()
        print(f"{name:<8}{window:>7}{(time.time() - t0) / 20 * 1000:>12.2f}   {errors}")
