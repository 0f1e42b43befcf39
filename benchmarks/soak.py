"""Soak: N consecutive tiny runs, then a Tune experiment of M tiny trials, on ONE local Ray
instance, in-process (what a notebook or a tune driver does). Measures what each run and the
experiment leave behind: actors alive, Ray worker processes alive, placement groups not removed,
files under Ray's session directory, checkpoint temp dirs, driver RSS. Idle worker processes are
kept 5 minutes for the next run to reuse (raytune_ft.train.ray_start.EMBEDDED_RAY_DEFAULTS), so their
count rises to a plateau; a leaked actor shows as an alive actor. Reported beside the counts: the
driver's RSS slope over the last 10 runs (least squares, MB per run: levelling off means near 0),
each run folder's size on disk (bounded: checkpoints kept are capped), and, after Ray shuts down,
what is left: processes under the driver and raytune_ft temp folders.

Run: make bench-soak   (writes benchmarks/results/soak.json; SOAK_RUNS=N, default 20, and
SOAK_TRIALS=M, default 16)
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from raytune_ft import load_recipe, run
from raytune_ft.train.ray_start import init_ray
from raytune_ft.search.experiment import run_experiment

ROOT = Path(__file__).resolve().parent.parent

RUNS = int(os.environ.get("SOAK_RUNS", "20"))
TRIALS = int(os.environ.get("SOAK_TRIALS", "16"))
OVERRIDES = ["data.max_rows=64", "train.epochs=1", "train.batch_size=16", "baseline.enabled=false",
             "train.early_stopping=null", "scaling.workers=2",
             "retention.references.0.data.max_rows=64"]  # the real retention path, at a tenth of its cost


def measure() -> dict:
    import ray
    from ray._private.worker import _global_node
    from ray.util.state import list_actors

    ours = psutil.Process().children(recursive=True)  # the embedded Ray this driver started
    # A worker names itself ray::IDLE, ray::<Actor> or ray::<task> once it starts; before, its
    # command line is default_worker.py. Ray's two agents are not workers.
    workers = [p for p in ours if (command := " ".join(_cmdline(p))) and ("default_worker.py" in command or (
        command.startswith("ray::") and not command.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))))]
    groups = ray.util.placement_group_table().values()
    actors = list_actors(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    session = Path(_global_node.get_session_dir_path())
    session_files = [p for p in session.rglob("*") if p.is_file()]
    return {
        "actors_alive": len(actors),
        "ray_worker_processes": len(workers),
        "placement_groups_not_removed": sum(group["state"] != "REMOVED" for group in groups),
        "placement_groups_total": len(groups),
        "session_dir_files": len(session_files),
        "session_dir_mb": sum(p.stat().st_size for p in session_files if p.exists()) / 2**20,
        "checkpoint_temp_dirs": len(list(Path(tempfile.gettempdir()).glob("raytune_ft_ckpt_*"))),
        "driver_rss_mb": psutil.Process().memory_info().rss / 2**20,
    }


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def slope(values: list[float]) -> float:
    """Least-squares slope of values against their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sum((x - mean_x) ** 2 for x in range(n))


def ray_processes() -> dict[int, str]:
    """Every Ray worker process on the machine (``ray::...``), whoever its parent, pid -> command
    line: a worker whose raylet is gone is re-parented to init, out of the driver's tree."""
    commands = {p.pid: " ".join(_cmdline(p)) for p in psutil.process_iter()}
    return {pid: command for pid, command in commands.items() if command.startswith("ray::")}


def left_behind(temp_before: set[Path], ray_before: dict[int, str]) -> dict:
    """After ray.shutdown(): processes still under the driver, Ray worker processes anywhere that
    were not there before the soak, raytune_ft temp folders made since the start."""
    import ray

    ray.shutdown()
    time.sleep(5)
    temp_now = set(Path(tempfile.gettempdir()).glob("raytune_ft_*")) - temp_before
    return {"processes": [" ".join(_cmdline(p))[:120] for p in psutil.Process().children(recursive=True)],
            "ray_processes_anywhere": [command[:120] for pid, command in ray_processes().items() if pid not in ray_before],
            "temp_dirs": sorted(p.name for p in temp_now if "soak" not in p.name)}


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def main() -> None:
    base = tempfile.mkdtemp(prefix="raytune_ft_soak_")
    first = load_recipe(ROOT / "jobs/text_classification.yaml", OVERRIDES + [f"output.dir={base}/run_000"])
    ray_before = ray_processes()  # another Ray's, before this soak's own start
    init_ray(None, first)
    before, temp_before = measure(), set(Path(tempfile.gettempdir()).glob("raytune_ft_*"))
    per_run, started = [], time.perf_counter()
    for index in range(RUNS):
        recipe = load_recipe(ROOT / "jobs/text_classification.yaml", OVERRIDES + [f"output.dir={base}/run_{index:03d}"])
        run_started = time.perf_counter()
        summary = run(recipe)
        time.sleep(5)  # let Ray reap the run's actors before counting what is left
        per_run.append({"run": index, "wall_s": time.perf_counter() - run_started,
                        "test_accuracy": summary["test"].get("accuracy"), "run_dir_mb": folder_mb(recipe.run_dir()), **measure()})
        shutil.rmtree(recipe.run_dir())  # each run keeps ~700 MB of checkpoints and model: 14 GB over 20 runs
        print(f"[soak] run {index + 1}/{RUNS}: {per_run[-1]}", flush=True)
        write_results(before, per_run, time.perf_counter() - started)  # after every run: a cut-short soak still reports
    tune = soak_tune(base) if TRIALS else None
    print(f"[soak] tune, {TRIALS} trials: {tune}", flush=True)
    write_results(before, per_run, time.perf_counter() - started, tune)
    leftovers = left_behind(temp_before, ray_before)
    print(f"[soak] after ray.shutdown(): {leftovers}", flush=True)
    write_results(before, per_run, time.perf_counter() - started, tune, leftovers)
    shutil.rmtree(base, ignore_errors=True)


def soak_tune(base: str) -> dict:
    """TRIALS trials of the same tiny job (random train.lr), 2 at a time, 1 worker each."""
    space = f"tune={{space: {{train.lr: {{loguniform: [1.0e-5, 1.0e-3]}}}}, num_samples: {TRIALS}, max_concurrent_trials: 2, seed: 0}}"
    recipe = load_recipe(ROOT / "jobs/text_classification.yaml", OVERRIDES + [space, f"output.dir={base}/tune"])
    before, started = measure(), time.perf_counter()
    summary = run_experiment(recipe)
    time.sleep(5)  # let Ray reap the trials' actors before counting what is left
    after = measure()
    experiment_mb = folder_mb(recipe.run_dir())
    shutil.rmtree(recipe.run_dir())
    return {"trials": TRIALS, "wall_s": time.perf_counter() - started, "best": summary.get("best"), "experiment_mb": experiment_mb,
            "before": before, "after": after, "growth": {key: after[key] - before[key] for key in before}}


def write_results(before: dict, per_run: list[dict], total_s: float, tune: dict | None = None, leftovers: dict | None = None) -> None:
    after = per_run[-1] if per_run else before
    last = [row["driver_rss_mb"] for row in per_run[-10:]]
    result = {"runs_requested": RUNS, "runs_done": len(per_run), "tune": tune,
              "driver_rss_slope_mb_per_run_last10": slope(last) if len(last) > 1 else None,
              "run_dir_mb_max": max((row["run_dir_mb"] for row in per_run), default=None),
              "left_after_shutdown": leftovers,
              "setup": {"model": "MiniLM-L6", "overrides": OVERRIDES, "cpu_count": os.cpu_count()},
              "before": before, "after_last_run": after, "total_s": total_s,
              "growth": {key: after[key] - before[key] for key in before}, "per_run": per_run}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
