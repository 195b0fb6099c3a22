#!/usr/bin/env bash
# The device check on a lent GPU (docs/BENCHMARKS.md, "The device check"):
#   bash benchmarks/device_check.sh [correctness|throughput|all] [--dry-run]
# Each half (correctness: steps 1-2; throughput: steps 3-6) stays under 5 minutes and is
# independent, so a session can run both and one again. Results land in $OUT (the device tool
# returns it; elsewhere ./device_check_out) after every step, at most 7 files:
#   env.txt  <half>.json  <half>.log  profile.txt  train_gpu.json
# On the device the carried wheels (.whl/, from benchmarks/device_wheels.sh) are installed first:
# the image lacks DeepSpeed, pydantic, hdf5plugin, blosc and nibabel, and has transformers 5.17
# where we pin 5.24. torch stays the image's (2.11, recorded in env.txt and every result).
# --dry-run: every step on the CPU at tiny sizes, without the wheels (tests/cli/test_device_check.py
# runs it); further options go to benchmarks/device_check.py (e.g. --budget-s).
set -uo pipefail
cd "$(dirname "$0")/.."
half=${1:-all}
shift || true
case "$half" in correctness|throughput|all) ;; *)
  echo "usage: $0 [correctness|throughput|all] [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/device_check_out}
mkdir -p "$OUT"
case " $* " in *" --dry-run "*) dry=1 ;; *) dry=0 ;; esac
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then  # cp312 wheels: the device only
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "device_check: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site
fi
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}
{
  date -u
  nvidia-smi 2>&1 | head -n 15
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "(the image torch; our pin is 2.13)")'
  "$PY" -m pip list 2>/dev/null | grep -iE '^(deepspeed|transformers|tokenizers|hdf5plugin|blosc|nibabel|pydantic|h5py|numpy) '
  echo "PYTHONPATH=$PYTHONPATH"
} > "$OUT/env.txt" 2>&1
status=0
for h in correctness throughput; do
  [ "$half" = all ] || [ "$half" = "$h" ] || continue
  "$PY" -m benchmarks.device_check "$h" --out "$OUT" "$@" 2>&1 | tee "$OUT/$h.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
