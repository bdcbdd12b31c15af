#!/usr/bin/env bash
# plait's CUDA path, checked on one GPU in one go (a few minutes on an H100/H200):
#   0. `plait train` with no options: on one GPU its four workers should be refused in one line;
#   1. `plait train` with its defaults on cuda in bfloat16, one process (tiny model, 200 steps),
#      traced, so that the CUDA-event timeline is exercised too;
#   1b. the same with the byte tokenizer: its 257 tokens padded to 320 rows, sampled from;
#   2. `plait train --model gpt2-124m` in bfloat16, one process: its MFU as plait reports it, and
#      the memory plan against the CUDA allocator's peak;
#   3. benchmarks/gpu.py: plait's step against a plain PyTorch loop of gpt2-124m (MFU, memory);
#   4. benchmarks/memory.py's one-process rows on cuda (float32/TF32): plan against measured;
#   5. the tests that need a GPU.
# Each part has its own time limit and a failing part does not stop the others.
#
#     bash scripts/gpu-check.sh                     # logs and summaries under $OUT (default /tmp/plait-gpu-check)
#     PY=.venv/bin/python DEVICE=cpu DRY=1 bash scripts/gpu-check.sh   # the plumbing on a CPU, tiny sizes
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/plait-gpu-check}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DRY=${DRY:-}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/plait-gpu-XXXX)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The GPU image has no tomli-w; carried as a wheel in .whl when the caller brings it.
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
exec > >(tee "$OUT/gpu-check.log") 2>&1

part() { echo; echo "=== $* ($(date +%T))"; }
summary() {  # run folder, name: the figures a run's summary.json holds, plan against measured
    [ -f "$1/summary.json" ] || { echo "no summary.json in $1"; return; }
    cp "$1/summary.json" "$OUT/$2-summary.json"
    $PY - "$1" <<'EOF'
import json, sys
from pathlib import Path
s = json.loads((Path(sys.argv[1]) / "summary.json").read_text())
for key in ("parameters", "flops_per_token", "median_step_time_s", "tokens_per_s", "peak_flops", "peak_source", "final_loss"):
    if key in s:
        print(f"{key:>20}: {s[key]}")
plan, meas = s.get("memory_plan_mib") or {}, s.get("measured_memory_mib") or {}
for rank in sorted(plan, key=int):
    p, m = plan[rank]["total"], meas.get(rank)
    parts = ", ".join(f"{k} {v:.0f}" for k, v in plan[rank].items() if k != "total")
    err = f"{(p - m) / m:+.1%}" if m else "n/a"
    print(f"  rank {rank}: plan {p:.0f} MiB, allocator peak {m if m is None else round(m)} MiB, plan error {err}")
    print(f"          plan parts: {parts}")
EOF
}

part "the machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
$PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible')"

if [ -n "$DRY" ]; then STEPS=4; BIG=tiny; SEQ=64; BATCH=2; else STEPS=200; BIG=gpt2-124m; SEQ=1024; BATCH=8; fi

part "0. plait train with no options at all (dp=2 x pp=2: four workers, more than one GPU holds)"
timeout 120 $PY -m plait train --steps 2 --no-progress --out "$WORK/defaults"
echo "exit $?"

part "1. plait train, defaults, $DEVICE bfloat16, one process, traced"
timeout 300 $PY -m plait train --device "$DEVICE" --dtype bfloat16 --dp 1 --pp 1 --microbatches 1 \
    --steps "$STEPS" --trace --no-progress --out "$WORK/tiny"
echo "exit $?"
summary "$WORK/tiny" tiny
[ -f "$WORK/tiny/sample.txt" ] && head -c 300 "$WORK/tiny/sample.txt" && echo

part "1b. plait train --tokenizer byte (257 tokens, padded to 320 rows), $DEVICE bfloat16, one process"
timeout 200 $PY -m plait train --device "$DEVICE" --dtype bfloat16 --tokenizer byte --dp 1 --pp 1 --microbatches 1 \
    --steps $((STEPS < 50 ? STEPS : 50)) --eval-every 0 --no-progress --out "$WORK/byte"
echo "exit $?"

part "2. plait train --model $BIG, $DEVICE bfloat16, one process, seq $SEQ, batch $BATCH"
timeout 300 $PY -m plait train --device "$DEVICE" --dtype bfloat16 --model "$BIG" --seq-len "$SEQ" \
    --global-batch "$BATCH" --dp 1 --pp 1 --microbatches 1 --steps $((STEPS < 30 ? STEPS : 30)) --eval-every 0 \
    --eval-batches 1 --sample-tokens 0 --no-progress --out "$WORK/big"
echo "exit $?"
summary "$WORK/big" big

part "3. benchmarks/gpu.py: plait against a plain PyTorch loop"
if [ -n "$DRY" ]; then timeout 300 $PY benchmarks/gpu.py --dry-run-cpu; else timeout 300 $PY benchmarks/gpu.py; fi
echo "exit $?"

part "4. benchmarks/memory.py, one-process rows, $DEVICE"
if [ -n "$DRY" ]; then
    timeout 300 $PY benchmarks/memory.py --quick --rows "one process,ckpt" --device "$DEVICE" --steps 3
else
    timeout 400 $PY benchmarks/memory.py --rows "one process,ckpt" --device "$DEVICE" --steps 6 --timeout 200
fi
echo "exit $?"

part "5. the tests that need a GPU"
timeout 200 $PY -m pytest -q -p no:cacheprovider -rs tests/test_checkpoint_async.py tests/test_gpu_benchmark.py 2>&1 | tail -15

part "done"
rm -rf "$WORK"
