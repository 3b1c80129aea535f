"""The q/k rotary + RMSNorm pass of train.py's attention, compiled, forward and forward+backward at
a 64-sequence micro-step's shapes (64 x 2048, 4 heads of 128): rotary by slicing the halves and concatenating,
against train.py's apply_rotary (rotary by roll), with a plain scale-by-2 of the same tensors as the
memory-speed yardstick. Needs a CUDA GPU.

    uv run benchmarks/bench_rotary.py
    TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 uv run benchmarks/bench_rotary.py
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from train_source import load_definitions  # noqa: E402

tr = load_definitions()  # train.py's apply_rotary and norm

B, T, H, D = 64, 2048, 4, 128
d = D // 2
inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
angles = torch.outer(torch.arange(T, dtype=torch.float32, device="cuda"), inv_freq)
cos, sin = angles.cos().bfloat16()[None, :, None, :], angles.sin().bfloat16()[None, :, None, :]
cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1)


def by_cat(a, b):  # a, b: (B, T, 512), the outputs of c_q and c_k
    def rotary(x):
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    return tr.norm(rotary(a.view(B, T, H, D))), tr.norm(rotary(b.view(B, T, H, D)))


def by_roll(a, b):  # train.py's form
    return tr.norm(tr.apply_rotary(a.view(B, T, H, D), cos2, sin2)), tr.norm(tr.apply_rotary(b.view(B, T, H, D), cos2, sin2))


def scale_only(a, b):  # the same bytes in and out, no reduction: memory speed
    return a.view(B, T, H, D) * 2, b.view(B, T, H, D) * 2


def bench(fn):
    f = torch.compile(fn, dynamic=False)
    torch.manual_seed(0)  # the same inputs for every variant
    a, b = (torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grads = [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    t = time.time()
    for _ in range(3):
        torch.autograd.backward(f(a, b), grads)
    torch.cuda.synchronize()
    compile_s = time.time() - t
    out = f(a, b)
    results = [*out, *torch.autograd.grad(out, (a, b), grads)]  # one call's outputs and gradients, to compare
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 50
    start.record()
    for _ in range(n):
        out = f(a, b)
    end.record()
    torch.cuda.synchronize()
    fwd = start.elapsed_time(end) / n
    a.grad = b.grad = None
    start.record()
    for _ in range(n):
        out = f(a, b)
        torch.autograd.backward(out, grads)
    end.record()
    torch.cuda.synchronize()
    both = start.elapsed_time(end) / n
    print(f"{fn.__name__:12s} forward {fwd:.3f} ms  forward+backward {both:.3f} ms  (compile + 3 calls {compile_s:.1f} s)", flush=True)
    return results  # (the timing loop accumulates into a.grad and b.grad: those are not compared)


reference = bench(by_cat)
for what, got, ref in zip(("q out", "k out", "q grad", "k grad"), bench(by_roll), reference):
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"  by_roll vs by_cat, {what}: relative difference {err:.2e}")
bench(scale_only)
print("coordinate_descent_tuning:", torch._inductor.config.coordinate_descent_tuning)
