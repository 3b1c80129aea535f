#!/usr/bin/env bash
# Two versions of train.py + prepare.py on one GPU, side by side: OLD_DIR's (a folder holding an
# earlier version's train.py and prepare.py, e.g. from `git show <commit>:train.py`) against this
# checkout's, each with its own cache prepared from SOURCE_DIR's shards (their token caches may
# differ), flash-attn-4's compiled kernels shared. Runs bench_train.py on old, new, old, new: the
# first pair pays for compilation, the second is warm. Tables and logs go to OUT.
#
#   OUT=results SOURCE_DIR=/data/shards BUDGET=30 bash benchmarks/side_by_side.sh old/
set -u
OLD_DIR=$(cd "$1" && pwd); SOURCE_DIR=${SOURCE_DIR:?the folder of shards to prepare from}; OUT=${OUT:-.}
BUDGET=${BUDGET:-30}; WORK=${WORK:-/tmp/side-by-side}
cd "$(dirname "$0")/.."
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/table.txt"
(cd "$OLD_DIR" && AUTORESEARCH_CACHE=$WORK/old python3 prepare.py --source-dir "$SOURCE_DIR" > "$OUT/prepare-old.log" 2>&1)
AUTORESEARCH_CACHE=$WORK/new python3 prepare.py --source-dir "$SOURCE_DIR" > "$OUT/prepare-new.log" 2>&1
mkdir -p "$WORK/new/flash-attn-4" && ln -sfn "$WORK/new/flash-attn-4" "$WORK/old/flash-attn-4"
i=0
for v in ${ORDER:-old new old new}; do
  script=train.py; [ "$v" = old ] && script=$OLD_DIR/train.py
  mkdir -p "$WORK/logs/$i-$v"
  AUTORESEARCH_CACHE=$WORK/$v python3 benchmarks/bench_train.py --budget "$BUDGET" --logs "$WORK/logs/$i-$v" "$script" \
    2>&1 | tail -n 1 | sed "s|^|$i $v |" | tee -a "$OUT/table.txt"
  i=$((i + 1))
done
for d in "$WORK"/logs/*; do echo "===== $d"; cat "$d"/*.log; done > "$OUT/logs.txt"
