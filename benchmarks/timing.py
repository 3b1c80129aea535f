"""GPU time of a function, for the micro-benchmarks: CUDA events around `iters` calls after 3
warm-up calls, in milliseconds per call."""

import torch


def cuda_ms(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
