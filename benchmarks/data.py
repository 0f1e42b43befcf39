"""The input pipeline measured on its own, and the data wait of real runs, per shipped recipe (issue 46).

1. **Pipeline alone.** Each recipe's train split (as shipped) through the code a run uses: read,
   decode / tokenise / featurise (Ray Data, cached once), then per epoch the loop's iterator (its
   batch size, shuffle buffer and collate) and the task's augmentation (here on the CPU), into a
   consumer that computes nothing. The figure is rows per CPU-second, i.e. rows/s per core: cold
   = epoch 1 (read and preprocessing included; the CPU of this process and every process it
   started, Ray's included), warm = later epochs (the cache iterated: this process's CPU, where
   that work runs). CPU time, unlike wall time, does not depend on what else the machine runs.
2. **Runs.** Each recipe run as ``raytune-ft run`` runs it (``raytune_ft.run``, one after another
   on one embedded Ray), for 2 epochs on 2 workers, on fewer rows than
   shipped (``RUN_ROWS``: the same pipeline, so the benchmark fits ~15 minutes on 2 cores), with
   the baseline, retention references, early stopping and the report off (they run outside the
   training steps): ``train/data_wait_fraction`` per epoch (the worst rank's time blocked on its
   next batch over the epoch's training time), samples/s, and whether the run printed DDP's
   "Grad strides do not match bucket view strides" or Ray's "worker processes have been started".
3. **Cores a worker needs** = the rows/s a worker's model consumes here (epoch 2) / the warm
   pipeline's rows/s per core.

Run: make bench-data   (writes benchmarks/results/data.json and data.png)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WARM_EPOCHS = 2  # at least; more until the warm epochs have used WARM_CPU_S
WARM_CPU_S = 2.0
# data.max_rows per split for the runs: about 6 optimizer steps an epoch (speech and the causal LM:
# fewer, costlier steps). In this order: the image recipes first (issue 46 found the data wait
# there); text_distillation's teacher is this benchmark's text_classification run.
RUN_ROWS = {"image_classification": 400, "multitask_easy_vqa": 400, "multimodal_vqa": 400, "text_classification": 224,
            "text_distillation": 224, "multitask": 224, "speech_recognition": 48, "causal_lm_lora": 48}
RUN_SETTINGS = ["train.epochs=2", "train.max_steps=null", "baseline.enabled=false", "retention=null", "train.early_stopping=null",
                "post.report=false", "scaling.workers=2"]
WARNINGS = {"ddp_grad_strides": "Grad strides do not match bucket view strides",
            "ray_worker_processes": "worker processes have been started"}
# The same image recipe on main before this change (issue 46): data wait over the whole run.
BEFORE = {"image_classification": {"data_wait_fraction_run": 0.26, "data_wait_fraction_epoch1_start": 0.60,
                                   "data_wait_fraction_epoch2_end": 0.06, "samples_per_s": 142,
                                   "source": "issue 46, measured on main: shipped recipe, 2 epochs, 2 workers"},
          "text_classification": {"data_wait_fraction_run": 0.001, "source": "README: make demo, 5 epochs, 2 workers"}}


def process_tree_cpu() -> dict[int, float]:
    """CPU seconds so far of this process and every process it started (Ray's included)."""
    import psutil

    me = psutil.Process()
    times = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
        except psutil.Error:
            pass
    return times


def cpu_since(before: dict[int, float]) -> float:
    """CPU seconds spent since ``before`` (a process started since counts whole)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in process_tree_cpu().items())


def iterate(dataset, recipe, task, epoch: int) -> int:
    """One epoch of the loop's iterator and augmentation into a consumer that computes nothing: rows."""
    import torch

    from raytune_ft.evaluation import Collate
    from raytune_ft.train.loop import PREFETCH_BATCHES

    train = recipe.train
    torch.manual_seed(train.seed * 1000 + epoch * 16)
    augment = getattr(task, "augment", None)
    rows = 0
    for batch in dataset.iter_torch_batches(batch_size=train.batch_size, collate_fn=Collate(task), prefetch_batches=PREFETCH_BATCHES,
                                            local_shuffle_buffer_size=recipe.data.shuffle_buffer or None,
                                            local_shuffle_seed=train.seed * 1000 + epoch):
        if augment:
            batch = augment(batch)
        rows += len(next(iter(batch.values())))
    return rows


def pipeline(name: str) -> dict[str, Any]:
    """The recipe's train pipeline alone: cold and warm rows per CPU-second."""
    from ray.data.dataset import MaterializedDataset

    from raytune_ft.recipe import load_recipe
    from raytune_ft.train.datasets import split_datasets
    from raytune_ft.train.planning import plan_run

    recipe = load_recipe(ROOT / "jobs" / f"{name}.yaml", ["retention=null", "distill=null"])
    planned = plan_run(recipe)
    train_only = dataclasses.replace(planned, splits=[split for split in planned.splits if split.name == "train"], addons={})
    before, started = process_tree_cpu(), time.perf_counter()
    datasets, rows, _ = split_datasets(recipe, train_only)
    dataset = datasets["train"]
    iterated = iterate(dataset, recipe, planned.task, 1)
    cold = {"rows": iterated, "cpu_s": cpu_since(before), "wall_s": time.perf_counter() - started}
    warm = {"epochs": 0, "rows": 0, "cpu_s": 0.0, "wall_s": 0.0}
    while warm["epochs"] < WARM_EPOCHS or (warm["cpu_s"] < WARM_CPU_S and warm["epochs"] < 50):
        cpu, started = time.process_time(), time.perf_counter()
        iterated = iterate(dataset, recipe, planned.task, 2 + warm["epochs"])
        warm = {"epochs": warm["epochs"] + 1, "rows": warm["rows"] + iterated, "cpu_s": warm["cpu_s"] + time.process_time() - cpu,
                "wall_s": warm["wall_s"] + time.perf_counter() - started}
    result = {
        "train_rows": rows, "batch_size": recipe.train.batch_size, "cached": isinstance(dataset, MaterializedDataset),
        "augmented": hasattr(planned.task, "augment"),
        "cold": {**cold, "rows_per_cpu_s": cold["rows"] / cold["cpu_s"]},
        "warm": {**warm, "rows_per_cpu_s": warm["rows"] / warm["cpu_s"]},
        "load_1min": os.getloadavg()[0],
    }
    print(f"[pipeline] {name}: {rows} rows; cold {result['cold']['rows_per_cpu_s']:.0f}, warm {result['warm']['rows_per_cpu_s']:.0f} "
          f"rows per CPU-s (load {result['load_1min']:.0f})", flush=True)
    return result


@contextlib.contextmanager
def stderr_to(path: Path):
    """This process's stderr (file descriptor 2) into ``path``: the workers' output that Ray forwards
    to the driver, and Ray's own warnings, land there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("w") as file:
        os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        time.sleep(2)  # Ray forwards the workers' last lines a moment later
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run(name: str, output: Path) -> dict[str, Any]:
    """The recipe as ``raytune-ft run`` runs it, for 2 epochs on 2 workers, on RUN_ROWS rows, in
    this process (on the Ray it started: one start-up for all the runs)."""
    import raytune_ft

    settings = [*RUN_SETTINGS, f"data.max_rows={RUN_ROWS[name]}", f"output.dir={output}"]
    if name == "text_distillation":
        settings.append(f"distill.teacher={output.parent / 'text_classification'}")
    started = time.perf_counter()
    with stderr_to(output.parent / f"{name}.log"):
        raytune_ft.run(raytune_ft.load_recipe(str(ROOT / "jobs" / f"{name}.yaml"), settings), force=True)
    epochs = [row for row in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if "train/data_wait_fraction" in row]
    printed = (output.parent / f"{name}.log").read_text()
    result = {
        "settings": settings[:-1], "wall_s": time.perf_counter() - started, "load_1min": os.getloadavg()[0],
        "data_wait_fraction": [row["train/data_wait_fraction"] for row in epochs],
        "samples_per_s": [row["train/samples_per_s"] for row in epochs],
        "warnings_printed": {key: text in printed for key, text in WARNINGS.items()},
    }
    print(f"[run] {name}: data wait per epoch {[f'{w:.1%}' for w in result['data_wait_fraction']]}, "
          f"samples/s {[round(s, 1) for s in result['samples_per_s']]}, {result['wall_s']:.0f} s, load {result['load_1min']:.0f}", flush=True)
    return result


def plot(recipes: dict[str, Any], path: Path) -> None:
    from raytune_ft.report.plots import _pyplot

    plt = _pyplot()
    names = [name for name in recipes if "run" in recipes[name]]
    figure, (rates, waits) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2.8), sharey=True)
    series = [("pipeline alone, warm (rows/s per core)", lambda r: r["pipeline"]["warm"]["rows_per_cpu_s"]),
              ("pipeline alone, cold (rows/s per core)", lambda r: r["pipeline"]["cold"]["rows_per_cpu_s"]),
              ("the model, per worker here (rows/s)", lambda r: r.get("model_rows_per_s_per_worker") or 0)]
    height = 0.8 / len(series)
    for index, (label, value) in enumerate(series):
        rates.barh([i + index * height for i in range(len(names))], [value(recipes[n]) for n in names], height, label=label)
    rates.set_yticks([i + height for i in range(len(names))], names)
    rates.set_xscale("log")
    rates.set_xlabel("rows per second (log)")
    rates.invert_yaxis()
    rates.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)  # below: bars reach every corner
    rates.set_title("Input pipeline alone vs what the model consumes")
    for index, (key, label) in enumerate([("data_wait_fraction_epoch1", "epoch 1"), ("data_wait_fraction_epoch2", "epoch 2")]):
        waits.barh([i + index * 0.4 for i in range(len(names))], [100 * recipes[n].get(key, 0) for n in names], 0.4, label=label)
    waits.axvline(2, color="black", linestyle="--", linewidth=1, label="target: 2% from epoch 2")
    waits.set_xlabel("data wait, % of training time (2 workers)")
    waits.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    waits.set_title("Data wait of real runs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def measure(name: str) -> dict[str, Any]:
    """One recipe: its pipeline alone, then its run; a failed run is recorded, not raised."""
    entry: dict[str, Any] = {}
    try:
        entry["pipeline"] = pipeline(name)
        entry["run"] = run(name, ROOT / "runs" / "bench_data" / name)
    except Exception as error:  # the other recipes still count
        entry["failed"] = f"{type(error).__name__}: {str(error)[-2000:]}"
        print(f"[{name}] failed: {entry['failed']}", flush=True)
        return entry
    waits, rates = entry["run"]["data_wait_fraction"], entry["run"]["samples_per_s"]
    per_core = entry["pipeline"]["warm"]["rows_per_cpu_s"]
    entry.update(
        pipeline_rows_per_s_per_core=per_core, pipeline_rows_per_s_per_core_cold=entry["pipeline"]["cold"]["rows_per_cpu_s"],
        data_wait_fraction_epoch1=waits[0], data_wait_fraction_epoch2=waits[1],
        model_rows_per_s_per_worker=rates[1] / 2, cores_per_worker=rates[1] / 2 / per_core,
        before=BEFORE.get(name),
    )
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=list(RUN_ROWS), help="shipped recipes (jobs/NAME.yaml)")
    parser.add_argument("--output", type=Path, default=RESULTS / "data.json")
    parser.add_argument("--budget-min", type=float, help="start no recipe that the last one's time says would end past this")
    args = parser.parse_args()

    import ray

    from raytune_ft.recipe import load_recipe
    from raytune_ft.train.ray_start import init_ray

    setup = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, no GPU; the 1-min load average at each measurement: load_1min; "
                   f"niceness {os.getpriority(os.PRIO_PROCESS, 0)}",
        "pipeline": f"train split as shipped (retention and distill off), batch size and shuffle buffer as shipped; 1 cold + "
                    f"{WARM_EPOCHS} or more warm epochs (until {WARM_CPU_S} CPU-s) in one process against a consumer that "
                    "computes nothing, augmentation on the CPU; rows per CPU-second: cold of this process and the Ray it "
                    "started, warm of this process",
        "runs": f"raytune_ft.run in one process on one embedded Ray, {', '.join(RUN_SETTINGS)}; data.max_rows per recipe "
                f"(train and test): {RUN_ROWS}; text_distillation's teacher is this benchmark's text_classification run",
        "gpu": "no GPU on this machine and no GPU measurement in this project yet: model rows/s per GPU (and so cores per "
               "GPU) are not measured; cores a GPU worker needs = its rows/s / pipeline_rows_per_s_per_core",
    }
    names = [name for name in RUN_ROWS if name in args.recipes]
    init_ray(None, load_recipe(ROOT / "jobs" / f"{names[0]}.yaml"))
    ray.data.range(8).map_batches(lambda batch: batch).materialize()  # Ray Data's first start-up is no recipe's cost
    (ROOT / "runs" / "bench_data").mkdir(parents=True, exist_ok=True)
    # Recipes measured before and not now (--recipes names fewer) keep their entries.
    earlier = json.loads(args.output.read_text())["recipes"] if args.output.exists() else {}
    recipes: dict[str, Any] = {name: entry for name, entry in earlier.items() if name not in names}

    def write() -> None:
        measured = [entry for entry in recipes.values() if "run" in entry]
        args.output.write_text(json.dumps({
            "setup": setup, "recipes": recipes,
            "all_data_wait_epoch2_at_most_2pct": len(measured) == len(RUN_ROWS) and all(e["data_wait_fraction_epoch2"] <= 0.02 for e in measured),
        }, indent=2) + "\n")
        if measured:
            plot(recipes, args.output.with_suffix(".png"))

    started, last = time.perf_counter(), 0.0
    for name in names:  # written after each recipe: an interrupted benchmark keeps what it measured
        if args.budget_min and time.perf_counter() - started + last > 60 * args.budget_min:
            setup["not_measured"] = f"{', '.join(names[names.index(name):])}: past the {args.budget_min} min budget"
            print(f"[budget] {setup['not_measured']}", flush=True)
            break
        recipe_started = time.perf_counter()
        recipes[name] = measure(name)
        last = time.perf_counter() - recipe_started
        write()
    write()
    for name, entry in recipes.items():
        if "run" in entry:
            print(f"{name:22s} pipeline {entry['pipeline_rows_per_s_per_core']:8.0f} rows/s/core (cold {entry['pipeline_rows_per_s_per_core_cold']:6.0f})  "
                  f"model {entry['model_rows_per_s_per_worker']:6.1f} rows/s/worker  cores/worker {entry['cores_per_worker']:.3f}  "
                  f"data wait epoch 1 {entry['data_wait_fraction_epoch1']:.1%}, epoch 2 {entry['data_wait_fraction_epoch2']:.1%}")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
