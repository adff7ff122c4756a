#!/usr/bin/env bash
# GPU checks for factedit, as one script (about 6 minutes on one H100; see bench/gpu_check.py):
# ROME/MEMIT seconds per edit and statistics throughput on randomly initialised GPT-2 XL- and
# Llama-2-7B-shaped models in float32 and bfloat16, beside plain truncated forwards, then every
# command with --device cuda, --dtype and --device-map auto.
#
#   bench/gpu_check.sh --prepare   # here, once: saves the default model's tokenizer into
#                                  # .gpu_check/ (ignored by git; carry it to the GPU machine)
#   bench/gpu_check.sh             # on the GPU machine (its python3 holds torch + transformers)
#   bench/gpu_check.sh --smoke     # tiny shapes on CPU in seconds (the test suite runs this)
#
# Extra arguments go to bench/gpu_check.py (e.g. --shapes gpt2-xl --dtypes bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A private cache: nothing from earlier runs is reused, and platformdirs is not needed.
CACHE="$(mktemp -d)"
trap 'rm -rf "$CACHE"' EXIT
export FACTEDIT_CACHE="${FACTEDIT_CACHE:-$CACHE}"
if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.gpu_check/' .git/info/exclude 2>/dev/null || echo '/.gpu_check/' >> .git/info/exclude
    unset FACTEDIT_CACHE  # the default model's de-quantised copy lives in the user cache
    exec "$PY" bench/gpu_check.py --tokenizer none --save-tokenizer .gpu_check/tokenizer
fi
exec "$PY" bench/gpu_check.py "$@"
