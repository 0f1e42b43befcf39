#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with what benchmarks/gpu_check.sh needs and the lent GPU machine
# lacks. That machine (Python 3.12, x86-64, no network) has torch, transformers, peft, accelerate,
# pyarrow, pandas, aiohttp, grpcio, typer and more, but not Ray, DeepSpeed or pydantic. Each
# version is the one installed in this project's environment ($PY), so the GPU runs what the tests
# ran here; the names below are what Ray (with its dashboard, Train, Tune and Data), DeepSpeed,
# pydantic and typer need less what that machine has (its package list, 2026-11-17).
#
# Two wheels are not PyPI's as they are:
# - DeepSpeed has no binary wheel: it is built here as pure Python (DS_BUILD_OPS=0: no CUDA op is
#   compiled; the check uses none, and an op DeepSpeed wanted would JIT-build there).
# - Ray's wheel (79 MB) carries Ray's Java worker (ray/jars, 32 MB packed), which a Python job
#   never loads. It is repacked without it, so everything travels in one call (64 MiB with the
#   working tree; two calls would need the machine still warm, 30 s after the first).
# Left out as unused by the check: py-spy (the dashboard's stack sampler), virtualenv and
# cryptography (runtime-env builds, Google Cloud credentials); running the dry check with them
# and everything else the GPU machine lacks blocked from import is how that was checked.
#
# Run: benchmarks/gpu_wheels.sh   (PY=path/to/python when the project's venv is not .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))
PACKAGES="ray pydantic pydantic-core annotated-types typing-inspection typer hjson tensorboardx
  jsonschema jsonschema-specifications referencing rpds-py aiohttp-cors colorful smart-open tzdata
  opencensus opencensus-context google-api-core google-auth googleapis-common-protos proto-plus pyasn1 pyasn1-modules
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-exporter-prometheus opentelemetry-proto"
# shellcheck disable=SC2086
pins=$("$PY" -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $PACKAGES)
deepspeed=$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')

rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$deepspeed" -w .whl

"$PY" - <<'REPACK'
"""Ray's wheel without ray/jars, its RECORD rewritten to match (pip checks it against the files)."""
import glob
import os
import zipfile

original = glob.glob(".whl/ray-*.whl")[0]
repacked = original + ".repacked"
with zipfile.ZipFile(original) as source, zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as target:
    for entry in source.infolist():
        if entry.filename.startswith("ray/jars/"):
            continue
        data = source.read(entry)
        if entry.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"ray/jars/"))
        target.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(repacked, original)
REPACK

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
ls -l .whl
echo "wheels $((wheels / 1024 / 1024)) MiB + working tree $((tree / 1024 / 1024)) MiB = $(((wheels + tree) / 1024 / 1024)) MiB of the 64 MiB one call carries"
if ((wheels + tree > LIMIT)); then
  echo "too much for one call: split .whl/ over two calls to a warm machine, or carry less" >&2
  exit 1
fi
echo 'one call: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)'
