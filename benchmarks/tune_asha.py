"""Grid vs ASHA vs Optuna+ASHA over one search space on a real recipe: the image recipe
(EfficientNet-Lite0 on Fashion-MNIST, the default) or the text recipe (MiniLM-L6, drug reviews).

    make bench-tune                                   # the full comparison (see docs/tuning.md for timings)
    .venv/bin/python benchmarks/tune_asha.py --recipe text --max-rows 300 --epochs 4
    .venv/bin/python benchmarks/tune_asha.py --max-rows 64 --epochs 2 --searches grid,asha

Every search sees the same 24 configurations (6 learning rates x 4 weight decays), the same data
(prepared once per search) and one worker per trial. The values of each dimension are listed in one
seeded random order: a grid runs its configurations in nested order, and ASHA judges a trial against
those that reached its rung before it, so values sorted from worst to best would hand ASHA its worst
case. Reported per search: the best validation accuracy, trial-epochs used (the cost), wall time,
and the per-trial start-up overhead (trial start to first report).
Writes benchmarks/results/tune_asha.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# recipe -> its file, the learning rates searched (a CNN fine-tunes at higher rates than a
# transformer) and the overrides that size it.
RECIPES = {
    "image": ("image_classification.yaml", [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2], []),
    "text": ("text_classification.yaml", [3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3], ["retention=null"]),
}
WEIGHT_DECAYS = [0.0, 0.01, 0.1, 0.3]


def shuffled(values: list[float], seed: int) -> list[float]:
    values = list(values)
    random.Random(seed).shuffle(values)
    return values


def search_section(kind: str, args, lrs: list[float], weight_decays: list[float]) -> dict:
    grid = {"train.lr": {"grid": lrs}, "train.weight_decay": {"grid": weight_decays}}
    section = {"space": grid, "searcher": "grid", "num_samples": 1, "metric": "eval/accuracy", "mode": "max",
               "max_concurrent_trials": args.concurrency, "workers_per_trial": 1, "seed": 0}
    if kind in ("asha", "optuna_asha"):
        section.update(scheduler="asha", asha={"grace_period": 1, "reduction_factor": args.reduction_factor})
    if kind == "optuna_asha":
        section.update(searcher="optuna", num_samples=len(lrs) * len(weight_decays),
                       space={"train.lr": {"choice": lrs}, "train.weight_decay": {"choice": weight_decays}})
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="image")
    parser.add_argument("--max-rows", type=int, default=1000, help="rows of each split (data.max_rows)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of a full trial (ASHA's max_t)")
    parser.add_argument("--reduction-factor", type=int, default=9, help="ASHA: 1/rf of the trials at a rung go on (9: rungs at epochs 1 and 9)")
    parser.add_argument("--image-size", type=int, default=32, help="image: pixels per side (32: an epoch of 800 images in ~5 s)")
    parser.add_argument("--order-seed", type=int, default=0, help="the seeded order of each dimension's values")
    parser.add_argument("--max-length", type=int, default=64, help="text: tokens per review")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="share of the rows held out to score trials")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once")
    parser.add_argument("--searches", default="grid,asha,optuna_asha")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "tune_asha.json"))
    args = parser.parse_args()

    from raytune_ft import load_recipe
    from raytune_ft.search.experiment import run_experiment

    work = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    recipe_file, lrs, sizing = RECIPES[args.recipe]
    sizing = sizing + [f"task.max_length={args.max_length}" if args.recipe == "text" else f"task.image_size={args.image_size}"]
    lrs, weight_decays = shuffled(lrs, args.order_seed), shuffled(WEIGHT_DECAYS, args.order_seed + 1)
    args.lr_order, args.weight_decay_order = lrs, weight_decays  # recorded with the settings
    # Searches not run now (--searches names fewer) keep their rows from the last run, marked.
    earlier = json.loads(Path(args.output).read_text())["searches"] if Path(args.output).exists() else {}
    rows = {kind: {**row, "measured": row.get("measured", "an earlier run")} for kind, row in earlier.items() if kind not in args.searches.split(",")}
    for kind in args.searches.split(","):
        recipe = load_recipe(ROOT / "jobs" / recipe_file, sizing + [
            f"data.max_rows={args.max_rows}", f"data.validation_fraction={args.validation_fraction}", f"train.epochs={args.epochs}",
            "train.early_stopping=null", "baseline.enabled=false", "output.checkpoints_to_keep=1",
            f"output.dir={work / kind}", f"tune={json.dumps(search_section(kind, args, lrs, weight_decays))}",
        ])
        started = time.perf_counter()
        summary = run_experiment(recipe)
        startup = [row["first_report_s"] for row in summary["rows"] if row["first_report_s"] is not None]
        # Trial start to first report includes epoch 1 itself; subtract a typical epoch (train +
        # evaluation, from the trials that finished) to see the start-up overhead alone.
        finished = [json.loads(path.read_text()) for path in (work / kind).glob("trials/trial_*/run/summary.json")]
        epoch_s = statistics.median((t["train_time_s"] + t["eval_time_s"]) / t["epochs"] for t in finished)
        rows[kind] = {
            "trials": summary["trials"], "failed": summary["failed"],
            "best_eval_accuracy": summary["best"]["eval/accuracy"], "best_trial": summary["best"]["trial"],
            "trial_epochs": summary["trial_epochs"], "wall_s": time.perf_counter() - started,
            "first_report_s_median": statistics.median(startup), "first_report_s_max": max(startup),
            "epoch_s_median": epoch_s, "startup_overhead_s_median": statistics.median(startup) - epoch_s,
            "measured": time.strftime("%Y-%m-%d %H:%M"),
        }
        rows[kind]["per_trial"] = trial_curves(work / kind)
        shutil.rmtree(work / kind)  # two dozen checkpoints and exports
        write_results(args, rows)


def trial_curves(experiment_dir: Path) -> list[dict]:
    """Each trial's configuration and validation accuracy after every epoch it ran (Tune's result.json)."""
    trials = []
    for trial in sorted((experiment_dir / "trials").glob("trial_*")):
        params = json.loads((trial / "params.json").read_text())
        reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
        trials.append({"trial": trial.name, "lr": params.get("train.lr"), "weight_decay": params.get("train.weight_decay"),
                       "eval_accuracy": [round(r["eval/accuracy"], 4) for r in reports if "eval/accuracy" in r]})
    return trials


def write_results(args, rows: dict) -> None:
    """The table so far (written after every search, so a partial run keeps what it measured)."""
    for row in rows.values():
        if "grid" in rows:
            row["accuracy_gap_to_grid"] = rows["grid"]["best_eval_accuracy"] - row["best_eval_accuracy"]
            row["epochs_vs_grid"] = row["trial_epochs"] / rows["grid"]["trial_epochs"]
    result = {"settings": vars(args), "configurations": len(RECIPES[args.recipe][1]) * len(WEIGHT_DECAYS), "searches": rows}
    if "asha" in rows:  # issue 44's figure: ASHA's median time from a trial's start to its first report (epoch 1 included)
        result["trial_startup_median_s"] = rows["asha"]["first_report_s_median"]
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
