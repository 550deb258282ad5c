#!/usr/bin/env bash
# The one-command GPU check of issue #17 (bench/README.md): bench/gpu_check.py does the work; this picks the
# python to run it with.
#
#   bench/gpu_check.sh [ARGS...]      ARGS go to bench/gpu_check.py (--help lists them)
#
# The python: $GPU_CHECK_PYTHON if set; else the first of the test venv (.venv), python3 and python whose
# torch sees CUDA; else the first whose torch does not (gpu_check.py then says there is no CUDA and exits 0).
# If none imports torch, it says so and exits 0: there is nothing to check on such a machine.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
  candidates=("$GPU_CHECK_PYTHON")
else
  candidates=("$repo/.venv/bin/python" python3 python)
fi

without_cuda=""
for python in "${candidates[@]}"; do
  command -v "$python" >/dev/null 2>&1 || continue
  "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null
  case $? in
    0) exec "$python" "$repo/bench/gpu_check.py" "$@" ;;
    3) without_cuda="${without_cuda:-$python}" ;;
  esac
done
if [[ -n "$without_cuda" ]]; then
  exec "$without_cuda" "$repo/bench/gpu_check.py" "$@"
fi
echo "gpu_check: no CUDA here: no python imports torch (tried ${candidates[*]}). Nothing to check; exiting 0."
exit 0
