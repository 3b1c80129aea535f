"""Every attention backend given (default: fa4 flex) against float64 math for the variants an agent
tries: grouped-query attention (fewer kv heads, down to 1), head sizes 64 and 128, windows from 1
to past the sequence. Prints the relative error of the output and of q's, k's and v's gradients;
bf16 kernels land near 2e-3. The CPU tests check sdpa and flex against the same reference; this
is for the GPU.

    uv run benchmarks/check_attention.py [fa4 flex sdpa]
"""

import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import prepare  # noqa: E402
from attention_reference import reference_attention  # noqa: E402


def main():
    warnings.simplefilter("ignore")  # FlexAttention uncompiled warns; this is a correctness check
    device = prepare.get_device()
    for backend in sys.argv[1:] or ["fa4", "flex"]:
        fn = prepare.make_attention(backend, device, 1024)
        for H, H_kv, D in ((4, 4, 128), (4, 2, 128), (4, 1, 128), (8, 2, 64), (6, 3, 128), (2, 1, 64)):
            for T, window in ((1024, 1023), (1024, 512), (1024, 100), (1000, 1), (512, 600)):
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v, dout = (torch.randn(2, T, h, D, device=device, generator=g).bfloat16() for h in (H, H_kv, H_kv, H))
                case = f"{backend} heads {H}/{H_kv} of {D}, T {T}, window {window}"
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                try:
                    out = fn(*leaves, window)
                    got = [out, *torch.autograd.grad(out, leaves, dout)]
                except Exception as e:
                    print(f"{case}: FAILED {prepare.first_line(e)}")
                    continue
                leaves = [t.double().requires_grad_() for t in (q, k, v)]
                out = reference_attention(*leaves, window)
                want = [out, *torch.autograd.grad(out, leaves, dout.double())]
                errors = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want)]
                print(f"{case}: out, dq, dk, dv relative error " + " ".join(f"{e:.1e}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
