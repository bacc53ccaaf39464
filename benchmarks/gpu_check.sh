#!/usr/bin/env bash
# One-command GPU check (issue 17): on a CUDA machine, the flash / cuDNN varlen backend's parity tests
# (tests/test_attention.py::TestFlashBackend: fp16/bf16 values and gradients vs fp32 per sequence) and the
# mixed-batch speed of varlen vs padded SDPA vs transformers (sdpa, and flash-attention-2 when installed), and
# (issue 25) the towers under torch.compile(fullgraph=True): NaFlex with the flash varlen backend and with the
# "blocks" backend, fixed resolution, text; parity with eager and speed (benchmarks/gpu_compile.py).
# Writes benchmarks/results/gpu_check.md; meant to finish in under 12 minutes on one GPU.
# Usage: benchmarks/gpu_check.sh   (or `make gpu-check`); PY=path/to/python to choose the interpreter.
set -u
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT=benchmarks/results
mkdir -p "$OUT"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False)." >&2
    echo "gpu_check: run it on a machine with an NVIDIA GPU and a CUDA build of torch; nothing was measured." >&2
    exit 2
fi

status=0
echo "gpu_check: parity tests (tests/test_attention.py::TestFlashBackend) ..."
HF_HUB_OFFLINE=1 timeout 120 "$PY" -m pytest tests/test_attention.py::TestFlashBackend -q -p no:cacheprovider \
    --junitxml="$OUT/gpu_check_parity.xml" > "$OUT/gpu_check_parity.log" 2>&1
parity=$?
tail -n 3 "$OUT/gpu_check_parity.log"
[ $parity -eq 0 ] || status=1

echo "gpu_check: mixed-batch speed (benchmarks/gpu_speed.py) ..."
timeout 240 "$PY" -m benchmarks.gpu_speed --parity-log "$OUT/gpu_check_parity.log" --parity-status $parity \
    --out "$OUT/gpu_check.md"
speed=$?
[ $speed -eq 0 ] || status=1

echo "gpu_check: compiled towers (benchmarks/gpu_compile.py) ..."
timeout 420 "$PY" -m benchmarks.gpu_compile --out "$OUT/gpu_check.md"
compiled=$?
[ $compiled -eq 0 ] || status=1
echo "gpu_check: report written to $OUT/gpu_check.md (parity exit $parity, speed exit $speed, compile exit $compiled)"
exit $status
