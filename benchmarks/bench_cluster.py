"""How long a candidate takes to start on a Ray cluster, against a local run: the seconds from
program.md's `ray job submit` command (taken from program.md word for word, with this checkout as
the worktree) to train.py's step 0, for jobs sent one after another, against `uv run train.py`
started here. Each job is stopped once its step 0 is printed. The second job on a node must build
and download nothing: its uv environment and data are the first job's; each job's line says what
it built. Run it on a node of the cluster, so that the local run has the same hardware, with the
variables program.md's cluster way needs:

    RAY_ADDRESS=http://<head>:8265 RAY_AUTH_MODE=token uv run --only-group cluster benchmarks/bench_cluster.py --jobs 2
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a job's output says it built or fetched: none of these may show in a node's second job
BUILT = {"environment": r"^Installed \d+ package", "data": r"^prepare: done", "tokens": r"^tokens: .*tokeniz"}


def submit_command(workdir):
    """program.md's wave command for one candidate, in `workdir`: its submission, word for word, then
    the job's output followed to stdout (the wave itself reads it once the job has ended)."""
    with open(os.path.join(ROOT, "program.md")) as f:
        lines = [line for line in f if "ray job\"; $r submit" in line]
    assert len(lines) == 1, "program.md should have one `ray job submit` command"
    m = re.search(r'r="(uv run [^"]* ray job)"; (\$r submit .*?) > \.\./wave\$i/run\.log 2>&1 &&', lines[0])
    assert m, f"program.md's submit command changed shape: {lines[0]}"
    ray_job, submit = m.group(1), m.group(2).replace("$r ", m.group(1) + " ").replace("../wave$i", workdir)
    return (f"out=$({submit} 2>&1); echo \"$out\"; id=$(echo \"$out\" | grep -om1 'raysubmit_[0-9A-Za-z]*') "
            f"&& exec {ray_job} logs --follow $id")


def timed_lines(command, marks, stop_at):
    """Runs command in bash; returns ({mark: seconds until its first line}, every line, the process)
    once a line matches stop_at (or the command ends). marks: {name: regex}."""
    t0 = time.time()
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    seen, lines = {}, []
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        for name, pattern in marks.items():
            if name not in seen and re.search(pattern, line):
                seen[name] = time.time() - t0
        if re.search(stop_at, line):
            break
    return seen, lines, proc


def drain(proc):
    """Reads the rest of a process's output in the background, so that it never blocks on a full pipe."""
    threading.Thread(target=proc.stdout.read, daemon=True).start()


def local_run(marks):
    """`uv run train.py` here, stopped at step 0: seconds until its header and its step 0."""
    seen, lines, proc = timed_lines("exec uv run train.py", marks, r"^step 0+ ")
    proc.terminate()
    drain(proc)
    proc.wait(timeout=60)
    if "step 0" not in seen:
        sys.exit("the local run ended before step 0:\n" + "\n".join(lines[-30:]))
    print(f"local `uv run train.py`: header {seen['header']:.1f} s, step 0 {seen['step 0']:.1f} s", flush=True)
    return seen["header"], seen["step 0"]


def machine_line():
    gpus = "no GPU"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip().splitlines()
        gpus = f"{len(out)} x {out[0].split(': ', 1)[1].split(' (')[0]}" if out else gpus
    import ray

    uv = subprocess.run(["uv", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{platform.node()}: {os.cpu_count()} CPUs, {gpus}, {platform.platform()}; ray {ray.__version__}, {uv}, "
            f"python {platform.python_version()}; {datetime.date.today()}")


def main():
    from ray.job_submission import JobStatus, JobSubmissionClient  # here: the tests import this file without Ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="jobs sent one after another (default 2)")
    args = parser.parse_args()
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        sys.exit("set RAY_ADDRESS to the head's job server, http://<head>:8265")
    client = JobSubmissionClient(address)
    print(machine_line(), flush=True)
    marks = {"header": r"^device: ", "step 0": r"^step 0+ "}

    local = [local_run(marks)]
    nodes, seconds = {}, []
    job_marks = {"submitted": r"Job '\w+' submitted successfully", "entrypoint": r"Running entrypoint for job",
                 **marks}
    for k in range(1, args.jobs + 1):
        seen, lines, proc = timed_lines(submit_command(ROOT), job_marks, r"^step 0+ |Job '\w+' (failed|was stopped)")
        if "step 0" not in seen:
            sys.exit(f"job {k} ended before step 0:\n" + "\n".join(lines[-30:]))
        job = re.findall(r"Job '(\w+)' submitted", "\n".join(lines))
        client.stop_job(job[0])
        drain(proc)
        for _ in range(120):  # bounded: a stopped job ends within seconds
            if client.get_job_status(job[0]) in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED):
                break
            time.sleep(0.5)
        proc.wait(timeout=60)
        node = client.get_job_info(job[0]).driver_node_id
        nodes[node] = nodes.get(node, 0) + 1
        built = [name for name, pattern in BUILT.items() if any(re.search(pattern, line) for line in lines)]
        print(f"job {k} on node {node[:8]} (its job {nodes[node]} here): " + ", ".join(f"{name} {s:.1f} s"
              for name, s in seen.items()) + f"; built: {', '.join(built) or 'nothing'}", flush=True)
        if nodes[node] >= 2:
            seconds.append((seen["header"], seen["step 0"]))
    local.append(local_run(marks))  # again, as the machine's load drifts
    if seconds:
        print("a node's later jobs, from submit to train.py's header / to step 0: "
              + ", ".join(f"{h:.1f} / {s:.1f} s" for h, s in seconds) + "; locally: "
              + ", ".join(f"{h:.1f} / {s:.1f} s" for h, s in local))
    else:
        print("no node ran two jobs: raise --jobs")


if __name__ == "__main__":
    main()
