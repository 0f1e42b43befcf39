"""The fixed cost of a run, side by side with plain torchrun: the demo recipe cut to 4 steps and no
retention reference, so what is left is start-up (Ray, Ray Data, the Train controller and
workers, imports, the model) and wrap-up (the test split scored, the model exported).

Fixed cost = the process's wall time minus its training time (the steps themselves), for:

- ``torchrun_cold``: ``torchrun --nproc_per_node 2 benchmarks/plain_ddp.py RECIPE ... --export DIR``: the same recipe,
  model, rows, batch and steps, pre-tokenised in memory, the test rows scored and the model
  exported;
- ``raytune_ft_cold``: ``raytune-ft run`` with its embedded Ray (started and stopped by the run);
- ``raytune_ft_attached``: ``raytune-ft run --address auto`` on a local Ray the user started
  beforehand (``ray start --head``);
- ``raytune_ft_warm``: ``raytune-ft run`` while a warm driver is up (``raytune-ft warm start``:
  its embedded Ray and the libraries loaded, raytune_ft.warm), as in a working session: the
  measured run starts once the driver's processes for its actors are ready (its pool, refilled
  after each command: ``warm_ready_s`` is how long that took after the first run).

In the last two the second run is measured (the first warms the Ray). Rounds alternate the four
(the machine is shared and noisy); medians are reported, and ``fixed_ratio_cold`` /
``fixed_ratio_warm`` are raytune-ft's cold / warm fixed cost over torchrun's cold one (targets
<= 1.5 and <= 1.0), ``fixed_ratio_attached`` the attached one's. The load average is recorded
with each round.

Run: make bench-startup   (writes benchmarks/results/startup.json)
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import psutil

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, ROWS, STEPS = 3, 128, 4
RUN = ["--set", f"data.max_rows={ROWS}", "--set", "train.epochs=null", "--set", f"train.max_steps={STEPS}", "--set", "baseline.enabled=false",
       "--set", "train.early_stopping=null", "--set", "post.report=false", "--set", "retention=null"]


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}).stdout
    return time.perf_counter() - started, output


def torchrun() -> dict[str, float]:
    process_s, output = timed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "benchmarks/plain_ddp.py",
                               "jobs/text_classification.yaml", *RUN, "--export", str(ROOT / "runs" / "bench_startup_plain")],
                              {"OMP_NUM_THREADS": "1"})
    result = json.loads(output.strip().splitlines()[-1])
    return {"process_s": process_s, "train_s": result["train_s"], "fixed_s": process_s - result["train_s"]}


WARM_ENV = {"RAYTUNE_FT_WARM_SOCKET": str(ROOT / "runs" / "bench_startup_warm" / "warm.sock")}


def raytune_ft(address: str | None = None, env: dict[str, str] | None = None) -> dict[str, float]:
    run_dir = ROOT / "runs" / "bench_startup"
    shutil.rmtree(run_dir, ignore_errors=True)  # not --force, which keeps the old run aside: 700 MB a run
    command = [sys.executable, "-m", "raytune_ft.cli", "run", "jobs/text_classification.yaml", "--output", str(run_dir), *RUN]
    process_s, _ = timed(command + (["--address", address] if address else []), env)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"process_s": process_s, "train_s": summary["train_time_s"], "fixed_s": process_s - summary["train_time_s"],
            "run_s": summary["wall_time_s"]}


def ray(*args: str) -> None:
    # The user's own environment, as for the runs: a Ray started with another RAY_AUTH_MODE than
    # its drivers' cannot call back into them (token auth is on by default), and a run waits.
    subprocess.run([str(Path(sys.executable).parent / "ray"), *args], cwd=ROOT, check=True, capture_output=True)


def warm_pool_ready() -> float:
    """Seconds until the warm driver's pool is ready after its last command: its processes asked
    for and their imports done (the machine idle again)."""
    started = time.perf_counter()
    while True:
        _, status = timed([sys.executable, "-m", "raytune_ft.cli", "warm", "status"], WARM_ENV)
        if "more starting" not in status and psutil.cpu_percent(interval=1) < 15 or time.perf_counter() - started > 120:
            return time.perf_counter() - started  # asked for, and done importing (the machine idle again)
        time.sleep(0.5)


def main() -> None:
    rounds: list[dict] = []
    for _ in range(ROUNDS):
        row = {"load_average": os.getloadavg()[0], "torchrun_cold": torchrun(), "raytune_ft_cold": raytune_ft()}
        ray("start", "--head", "--num-cpus", str(max(4, os.cpu_count() or 1)), "--disable-usage-stats", "--include-dashboard", "false")
        try:
            raytune_ft("auto")  # the first run on the running Ray warms it
            row["raytune_ft_attached"] = raytune_ft("auto")
        finally:
            ray("stop", "--force")
        timed([sys.executable, "-m", "raytune_ft.cli", "warm", "start"], WARM_ENV)
        try:
            raytune_ft(env=WARM_ENV)
            row["warm_ready_s"] = warm_pool_ready()
            row["raytune_ft_warm"] = raytune_ft(env=WARM_ENV)
        finally:
            timed([sys.executable, "-m", "raytune_ft.cli", "warm", "stop"], WARM_ENV)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    medians = {name: {key: median(row[name][key] for row in rounds) for key in rounds[0][name]}
               for name in ("torchrun_cold", "raytune_ft_cold", "raytune_ft_attached", "raytune_ft_warm")}
    result = {
        "setup": {"recipe": "jobs/text_classification.yaml (MiniLM-L6)", "rows": ROWS, "steps": STEPS, "workers": 2, "retention": None,
                  "baseline": False, "rounds": ROUNDS, "cpus": os.cpu_count(),
                  "attached": "a local `ray start --head` running; the second run on it is measured (the first warms it)",
                  "warm": "a warm driver up (`raytune-ft warm start`); the second run in it is measured, once the driver has its "
                          "processes ready (warm_ready_s after the first)"},
        **medians,
        "fixed_ratio_cold": medians["raytune_ft_cold"]["fixed_s"] / medians["torchrun_cold"]["fixed_s"],
        "fixed_ratio_warm": medians["raytune_ft_warm"]["fixed_s"] / medians["torchrun_cold"]["fixed_s"],
        "fixed_ratio_attached": medians["raytune_ft_attached"]["fixed_s"] / medians["torchrun_cold"]["fixed_s"],
        "warm_ready_s": median(row["warm_ready_s"] for row in rounds),
        "rounds": rounds,
    }
    out = ROOT / "benchmarks" / "results" / "startup.json"
    out.write_text(json.dumps(result, indent=2))
    for name, m in medians.items():
        print(f"{name:16s} process {m['process_s']:6.1f} s  training {m['train_s']:5.1f} s  fixed {m['fixed_s']:5.1f} s")
    print(f"fixed cost over torchrun's: cold {result['fixed_ratio_cold']:.2f} (target <= 1.5), warm {result['fixed_ratio_warm']:.2f} "
          f"(target <= 1.0), attached {result['fixed_ratio_attached']:.2f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
