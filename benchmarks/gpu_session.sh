#!/usr/bin/env bash
# The GPU measurements of the 8-bit and grouped kernels, in one run that fits one device
# call (about 8 minutes on an H200 by the sizes below; each step has its own time limit):
#
#   1. the Pallas 8-bit kernel compiled by Triton against the XLA path (codes that differ,
#      θ ulps), then ms per step for 1e8 parameters in one leaf and for the GPT-2 small
#      tree (both 8-bit codes; update_and_apply, update + apply_updates, XLA path) and
#      compile seconds (benchmarks/adam_8bit.py);
#   2. the grouped float32/bf16-moment kernel next to XLA's per-leaf fusions on 148 leaves
#      of 1.24e8 parameters in all (benchmarks/update_step.py --gpu-grouped).
#
#   bash benchmarks/gpu_session.sh            # logs into $OUT if set, else ./gpu_logs
#   SMOKE=1 bash benchmarks/gpu_session.sh    # tiny sizes, any machine: checks the script
#
# Runs from the working tree (PYTHONPATH), so nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_logs}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

size=1e8
grouped=(--sizes 1.24e8 --leaves 148 --rounds 5 --compile-leaves 148)
eight_bit=(--gpt2-steps --rounds 5)
if [ "${SMOKE:-0}" = 1 ]; then
  size=1e5
  grouped=(--sizes 1e5 --leaves 4 --rounds 1 --reps 1 --compile-leaves 4 --no-torch)
  eight_bit=(--no-compile --rounds 1 --reps 1)
fi

status=0
step() {  # step NAME SECONDS COMMAND...: runs it with a limit, its output also in $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name exited with $rc"; status=1; }
}

step devices 60 python -c "import jax; print(jax.__version__, jax.devices())"
step adam_8bit 330 python benchmarks/adam_8bit.py --size "$size" "${eight_bit[@]}"
step update_step 150 python benchmarks/update_step.py "${grouped[@]}" --gpu-grouped
echo "== done ($(date -u +%H:%M:%S)); logs in $out"
exit "$status"
