"""Every attention backend given (default: fa4 flex) against float64 math for the variants an agent
tries: grouped-query attention (fewer kv heads, down to 1), head sizes 64 and 128, windows from 1
to past the sequence. Prints the relative error of the output and of q's, k's and v's gradients;
bf16 kernels land near 2e-3. The CPU tests check sdpa and flex against the same reference; this
is for the GPU.

    uv run benchmarks/check_attention.py [fa4 flex sdpa]
"""

import math
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402


def expand_heads(kv, n_head):  # each key/value head repeated for the query heads that share it
    return kv.repeat_interleave(n_head // kv.size(2), dim=2)


def band_scores(q, k, window):
    """Attention scores in float64, -inf outside the band j <= i, i - j <= window."""
    T, D = q.size(1), q.size(-1)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    scores = torch.einsum("bthd,bshd->bhts", q.double(), expand_heads(k, q.size(2)).double()) / math.sqrt(D)
    return scores.masked_fill(~((j <= i) & (i - j <= window)), float("-inf"))


def reference_attention(q, k, v, window):
    return torch.einsum("bhts,bshd->bthd", band_scores(q, k, window).softmax(-1), expand_heads(v, q.size(2)).double())


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
