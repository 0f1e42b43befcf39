#!/usr/bin/env bash
# The GPU check (issue 39, item 7; benchmarks/gpu_check.py says what it measures): raytune-ft vs
# plain torchrun on one GPU, bf16 MFU of SmolLM2-135M and a 1B Llama, ZeRO-3 memory on the GPU.
# About 6-7 minutes on one H100 (an estimate: it has not run on a GPU yet); writes
# benchmarks/results/gpu_*.json and copies them, with its output and the commands' log tails, to $OUT.
#
# On a lent GPU machine (the device tool), from the session's own checkout (only that one
# travels), after `benchmarks/gpu_wheels.sh` has filled .whl/ here (Ray, DeepSpeed and what they
# need that the machine lacks: 53 MiB with the working tree, under one call's 64), ONE call:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# then copy the files it brought back into benchmarks/results/ and commit them. To rerun some
# parts on the same warm machine (the wheels are installed once per machine):
#
#   run(command="bash benchmarks/gpu_check.sh --parts zero3", carry=[".whl"], timeout_s=400)
#
# Here, without a GPU, every part runs on the CPU with tiny models (minutes: 2 raytune-ft runs,
# 2 torchruns, 3 Ray Train runs; files in runs/gpu_check_dry):  benchmarks/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=/tmp/gpu_check_site
# The carried wheels, installed once per machine, where this Python has no Ray of its own.
if ! [ -e "$SITE/.installed" ] && compgen -G ".whl/*.whl" > /dev/null \
  && ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("ray") is None)'; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  touch "$SITE/.installed"
fi
if [ -e "$SITE/.installed" ]; then
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project from this checkout; no hub, no usage reports (the GPU machine has no network).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
if [ -n "${OUT:-}" ]; then  # the whole output comes back too (the device tool returns only its tail)
  "$PYTHON" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check_output.txt"
  exit "${PIPESTATUS[0]}"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
