"""Writes train_instrumented.py next to train.py: the same run, plus prints of where the time
and memory go. Used for the breakdowns in benchmarks/README.md.

    python3 benchmarks/make_instrumented.py && python3 train_instrumented.py
    python3 benchmarks/make_instrumented.py variant.py variant_instrumented.py  # another copy

Prints: start-up marks ([startup]), Dynamo's compile-time table after step 0, peak memory of
step 14's forward+backward and optimizer ([mem]), the inference compile and forward time before
evaluation ([eval]). Environment: DBS=<n> overrides DEVICE_BATCH_SIZE; PROF=1 also writes a
torch-profiler table and chrome trace of steps 15-17 (read the trace with gpu_gaps.py) and a CUDA
memory snapshot of step 14 to $OUT (TAG is added to their names). The edits replace lines of code, matched
with comments ignored (tests/train_source.py): if the code changed, this fails loudly
(tests/test_benchmarks.py checks they apply).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from train_source import edit_code  # noqa: E402

SRC = sys.argv[1] if len(sys.argv) > 1 else "train.py"
DST = sys.argv[2] if len(sys.argv) > 2 else "train_instrumented.py"
src = open(os.path.join(ROOT, SRC)).read()


def rep(old, new):
    global src
    src = edit_code(src, old, new)


rep("t_start = time.time()\n", "t_start = time.time()\nimport os\nDEVICE_BATCH_SIZE = int(os.environ.get('DBS', DEVICE_BATCH_SIZE))\nTAG = os.environ.get('TAG', '')\nPROF = os.environ.get('PROF') == '1'\nOUT = os.environ.get('OUT', '.')\ndef _mark(name):\n    print(f'[startup] {name} {time.time() - t_start:.2f}s', flush=True)\n")
rep("device = prepare.get_device()\n", "device = prepare.get_device()\ntorch.zeros(1, device=device); _mark('cuda init')\n")
rep("tokenizer = Tokenizer.from_directory()\n", "tokenizer = Tokenizer.from_directory()\n_mark('tokenizer')\n")
rep("attention_name, attention = prepare.select_attention(device, SEQ_LEN, HEAD_DIM, config.n_head, config.n_kv_head)\n", "attention_name, attention = prepare.select_attention(device, SEQ_LEN, HEAD_DIM, config.n_head, config.n_kv_head)\n_mark('select_attention')\n")
rep("config.fused_mlp, config.fused_loss = not mlp_note, not loss_note\n", "config.fused_mlp, config.fused_loss = not mlp_note, not loss_note\n_mark('kernel checks')\n")
rep("num_params = sum(", "_mark('model built')\nnum_params = sum(")
rep("tokens_per_micro = DEVICE_BATCH_SIZE", "_mark('optimizer+compile wrap')\ntokens_per_micro = DEVICE_BATCH_SIZE")
rep("startup_seconds = time.time() - t_start\n", "_mark('first batch')\nstartup_seconds = time.time() - t_start\n")
# profiling window inside the loop
rep("    try:\n        loss, x, y, epoch = train_step(train_loader, x, y)\n",
"""    if PROF and step == 13:
        torch.cuda.memory._record_memory_history(max_entries=100000)
    if step == 14:
        torch.cuda.reset_peak_memory_stats(); m0 = torch.cuda.memory_allocated()
    if PROF and step == 15:
        _prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
        _prof.__enter__(); _t_prof = time.time()
    try:
        loss, x, y, epoch = train_step(train_loader, x, y)
        if step == 14:
            torch.cuda.synchronize(); print(f'[mem] before step {m0/2**30:.2f} GiB, peak fwd+bwd {torch.cuda.max_memory_allocated()/2**30:.2f} GiB, after bwd {torch.cuda.memory_allocated()/2**30:.2f} GiB')
""")
rep("    optimizer.step()\n    model.zero_grad(set_to_none=True)\n    train_loss = loss.item()\n",
"""    optimizer.step()
    model.zero_grad(set_to_none=True)
    train_loss = loss.item()  # waits for the GPU
    if step == 14:
        print(f'[mem] peak incl optimizer {torch.cuda.max_memory_allocated()/2**30:.2f} GiB, reserved {torch.cuda.memory_reserved()/2**30:.2f} GiB')
        if PROF:
            torch.cuda.memory._dump_snapshot(os.path.join(OUT, f'mem_step14{TAG}.pickle')); torch.cuda.memory._record_memory_history(enabled=None)
    if PROF and step == 17:
        torch.cuda.synchronize(); _prof.__exit__(None, None, None)
        print(f'[prof] steps 15-17: {(time.time() - _t_prof) * 1000:.1f} ms of wall time', flush=True)
        _prof.export_chrome_trace(os.path.join(OUT, f'trace{TAG}.json'))
        with open(os.path.join(OUT, f'profile_table{TAG}.txt'), 'w') as f:
            f.write(_prof.key_averages().table(sort_by='cuda_time_total', row_limit=80, max_name_column_width=90))
    if step == 0:
        try:
            print(torch._dynamo.utils.compile_times(repr='str', aggregate=True))
        except Exception as e:
            print('compile_times failed', e)
""")
rep("model.eval()\nt_eval = time.time()\n",
"""model.eval()
torch.cuda.reset_peak_memory_stats()
_t = time.time()
with torch.no_grad(), prepare.autocast(device):
    _l = run_model(x, y, reduction='none'); torch.cuda.synchronize()
print(f'[eval] first forward (compile) {time.time() - _t:.2f}s', flush=True)
_t = time.time()
with torch.no_grad(), prepare.autocast(device):
    for _ in range(5):
        _l = run_model(x, y, reduction='none')
    torch.cuda.synchronize()
print(f'[eval] forward {(time.time() - _t) / 5 * 1000:.1f} ms per {x.numel()} tokens', flush=True)
t_eval = time.time()
""")
rep("print(f\"time outside training:", "print(f'[mem] eval peak {torch.cuda.max_memory_allocated()/2**30:.2f} GiB')\nprint(f\"time outside training:")
open(os.path.join(ROOT, DST), "w").write(src)
