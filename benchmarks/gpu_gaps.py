"""Where the GPU waited: idle gaps between kernels in a torch-profiler chrome trace.

    PROF=1 OUT=prof python3 train_instrumented.py        # see make_instrumented.py: writes prof/trace.json
    python3 benchmarks/gpu_gaps.py prof/trace.json

Prints the span from the first kernel to the last, the time kernels ran (overlaps counted once),
the idle time left over, the longest gaps with the kernel that ended each and the CPU ops running
when the next one was launched, the idle time summed by those CPU ops, and the kernel time by
kernel name (which kernels to make faster). Idle time is what CUDA graphs or fewer launches could
win back; kernel time is what only faster kernels can.
"""

import bisect
import collections
import json
import sys

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("cpu_op", "user_annotation", "python_function")


def analyse(trace):
    """Returns (span_us, busy_us, gaps) where gaps are (idle_us, previous kernel, next kernel, CPU
    ops active when the next kernel was launched, outermost first), longest first."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit("no GPU kernels in this trace: was it recorded with ProfilerActivity.CUDA on a GPU?")
    launches = {e["args"]["correlation"]: e["ts"] for e in events if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    cpu = sorted((e for e in events if e.get("cat") in CPU_CATEGORIES), key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu]

    def active(ts):  # CPU ops spanning ts; one starting more than 5000 ops earlier is ignored (speed)
        i = bisect.bisect_right(starts, ts)
        return [e["name"] for e in cpu[max(0, i - 5000) : i] if ts <= e["ts"] + e["dur"]]

    busy, gaps = 0.0, []
    end, previous = gpu[0]["ts"], gpu[0]
    for k in gpu:
        if k["ts"] > end:
            launched = launches.get(k.get("args", {}).get("correlation"))
            gaps.append((k["ts"] - end, previous["name"], k["name"], active(launched) if launched is not None else []))
        busy += max(0.0, k["ts"] + k["dur"] - max(k["ts"], end))  # overlapping kernels count once
        if k["ts"] + k["dur"] > end:
            end, previous = k["ts"] + k["dur"], k
    return end - gpu[0]["ts"], busy, sorted(gaps, key=lambda g: -g[0])


def by_name(trace):
    """[(name, total duration in us, calls)] of the GPU events, longest total first."""
    total, calls = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES:
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    return [(name, us, calls[name]) for name, us in total.most_common()]


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: python3 benchmarks/gpu_gaps.py TRACE.json")
    try:
        trace = json.load(open(sys.argv[1]))
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read {sys.argv[1]} as a JSON chrome trace ({e}): pass the trace.json the profiler wrote")
    span, busy, gaps = analyse(trace)
    idle = span - busy
    print(f"span {span / 1e3:.1f} ms | kernels {busy / 1e3:.1f} ms | idle {idle / 1e3:.1f} ms ({100 * idle / span:.1f}%) in {len(gaps)} gaps")
    print("\nlongest gaps:")
    for us, before, after, ops in gaps[:15]:
        print(f"{us:8.0f} us  after {before[:40]!r} before {after[:40]!r}  launched in: {' > '.join(o[:40] for o in ops[:3]) or '(no recorded op)'}")
    by_op = collections.Counter()
    for us, _, _, ops in gaps:
        by_op[" > ".join(o[:40] for o in ops[:2]) or "(no recorded op)"] += us
    print("\nidle time by the CPU ops running at the next launch:")
    for ops, us in by_op.most_common(10):
        print(f"{us / 1e3:8.2f} ms  {ops}")

    print("\nkernel time by name (sums over the whole trace):")
    for name, us, n in by_name(trace)[:25]:
        print(f"{us / 1e3:8.2f} ms {n:6d}x  {name[:110]}")


if __name__ == "__main__":
    main()
