"""Where the start-up of a GPU run goes: importing flash-attn-4 (and the CuTe DSL compiler under
it), its first forward and backward per kernel (compiled on a machine's first run, loaded from
$AUTORESEARCH_CACHE/flash-attn-4 after that), prepare.select_attention's check, train.py's check of
its fused kernels (Triton compiles them on a first run), and the import of torch.compile's
machinery. Run it twice to see first-run and cached figures. Needs a Hopper or Blackwell GPU and
`uv run prepare.py`'s cache folder.

    uv run benchmarks/bench_startup.py
"""

import os
import sys
import time

T0 = time.time()
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from train_source import load_definitions, prepare, train_config  # noqa: E402


def mark(label, t):
    torch.cuda.synchronize()
    print(f"{label:40s} {time.time() - t:7.3f}s", flush=True)


t = time.time()
torch.zeros(1, device="cuda")
mark("cuda init", t)
device = torch.device("cuda")
t = time.time()
fn = prepare.make_attention("fa4", device, 2048)  # imports flash_attn.cute.interface, sets its cache
mark("make_attention fa4 (the import)", t)
# the check's shapes (1 x 256, 2 heads), again, then a 64-sequence micro-step's (64 x 2048, 4 heads)
for B, T, H, w in [(1, 256, 2, 64), (1, 256, 2, 256), (1, 256, 2, 64), (64, 2048, 4, 1024), (64, 2048, 4, 2048)]:
    q, k, v, dout = (torch.randn(B, T, H, 128, device=device, dtype=torch.bfloat16) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    t = time.time()
    out = fn(q, k, v, w)
    mark(f"fwd B{B} T{T} w{w}", t)
    t = time.time()
    torch.autograd.grad(out, (q, k, v), dout)
    mark(f"bwd B{B} T{T} w{w}", t)
t = time.time()
name, _ = prepare.select_attention(device, 2048, 128)
mark(f"select_attention (again) -> {name}", t)
t = time.time()
tr = load_definitions()
notes = tr.check_fused_kernels(device, train_config(tr, 2048, 8192))  # compiles the kernels on a first run, loads them after
mark(f"check_fused_kernels -> {notes}", t)
t = time.time()
import torch._dynamo  # noqa: E402, F401
import torch._inductor.compile_fx  # noqa: E402, F401

mark("import dynamo+inductor", t)
print(f"total {time.time() - T0:.2f}s")
