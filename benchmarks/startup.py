"""The fixed cost of a run: `raytune-ft run` of the demo recipe cut to 4 steps and no retention
reference, so what is left is start-up (Ray, Ray Data reads, the Train controller and workers)
and wrap-up. raytune-ft's settings against Ray's defaults, alternating, side by side in one run:

- Ray Data's V1 parquet reader (V2 spends ~3 s planning even a one-file read),
- no preemption-watcher actor on a one-host cluster,
- the Train controller polling its workers every 0.5 s instead of 2 s,
- idle worker processes kept 5 minutes instead of 1 s, so a later Train run in the same Ray can
  reuse processes that already imported torch and transformers.

Two cases: one run (baseline off) and two runs (the head-only baseline, then the main run).

Run: make bench-startup   (writes benchmarks/results/startup.json)
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
RAY_DEFAULTS = {"RAY_DATA_USE_DATASOURCE_V2": "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2",
                "RAY_idle_worker_killing_time_threshold_ms": "1000"}
CASES = {"one run": "false", "two runs": "true"}  # baseline.enabled: the head-only baseline is a Train run of its own


def one_run(env: dict[str, str], baseline: str) -> dict[str, float]:
    run_dir = ROOT / "runs" / "bench_startup"
    command = [
        sys.executable, "-m", "raytune_ft.cli", "run", "jobs/text_classification.yaml", "--force", "--output", str(run_dir),
        "--set", "data.max_rows=128", "--set", "train.epochs=null", "--set", "train.max_steps=4",
        "--set", f"baseline.enabled={baseline}", "--set", "train.early_stopping=null", "--set", "post.report=false", "--set", "retention=null",
    ]
    started = time.perf_counter()
    output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True,
                            env={**{k: v for k, v in os.environ.items() if k not in RAY_DEFAULTS}, **env}).stdout
    process_s = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    data_ready = float(re.search(r"data ready in ([0-9.]+) s", output).group(1))
    return {"process_s": process_s, "run_s": summary["wall_time_s"], "data_ready_s": data_ready,
            "train_s": summary["train_time_s"]}


def main() -> None:
    rounds: dict[str, dict[str, list]] = {case: {"raytune_ft_settings": [], "ray_defaults": []} for case in CASES}
    for _ in range(ROUNDS):
        for case, baseline in CASES.items():
            rounds[case]["raytune_ft_settings"].append(one_run({}, baseline))
            rounds[case]["ray_defaults"].append(one_run(RAY_DEFAULTS, baseline))
    result: dict = {"setup": {"recipe": "jobs/text_classification.yaml", "rows": 128, "steps": 4, "retention": None,
                              "workers": 2, "rounds": ROUNDS, "cases": {case: f"baseline.enabled={b}" for case, b in CASES.items()}}}
    for case, runs in rounds.items():
        medians = {name: {key: median(run[key] for run in series) for key in series[0]} for name, series in runs.items()}
        ratio = medians["raytune_ft_settings"]["process_s"] / medians["ray_defaults"]["process_s"]
        result[case] = {**medians, "ratio_process_s": ratio, "rounds": runs}
        for name, m in medians.items():
            print(f"{case:9s} {name:20s} process {m['process_s']:6.1f} s  run {m['run_s']:6.1f} s  "
                  f"data ready {m['data_ready_s']:5.1f} s  training {m['train_s']:5.1f} s")
        print(f"{case:9s} ratio (ours / Ray defaults, whole process): {ratio:.2f}")
    out = ROOT / "benchmarks" / "results" / "startup.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
