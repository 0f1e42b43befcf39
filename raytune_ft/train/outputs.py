"""A run's written outputs: ``metrics.jsonl``, ``plots/`` and, last, ``summary.json``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raytune_ft import run_folder
from raytune_ft.addons import ADDONS
from raytune_ft.evaluation import numbers
from raytune_ft.report import plots
from raytune_ft.schema import Recipe


def write_outputs(run_dir: Path, recipe: Recipe, state: dict[str, Any], baseline: dict[str, Any] | None, wall_s: float,
                  bad_rows: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the run's metrics, plots and summary (last: its presence means finished); return the summary."""
    history = state["history"]
    test = numbers(state.get("test", {}))
    rows = history + ([{"epoch": state["epoch"], "step": state["step"], **{f"test/{k}": v for k, v in test.items()}}] if test else [])
    run_folder.write_text_atomic(run_dir / run_folder.METRICS, "".join(json.dumps(row) + "\n" for row in rows))
    final_eval = {k.removeprefix("eval/"): v for k, v in history[-1].items() if k.startswith("eval/")} if history else {}
    target = test or final_eval
    base_target = (baseline or {}).get("test") or (baseline or {}).get("eval") or {}
    summary = {
        "name": recipe.name, "task": recipe.task.type, "model": recipe.model.path, "strategy": recipe.strategy.method,
        "backend": recipe.train.backend, "workers": recipe.scaling.workers,
        "epochs": state["epoch"], "steps": state["step"], "stopped_early": state["stopped_early"], "best_epoch": state["best_epoch"],
        "resumed_at": state.get("resumed_at", []),  # where restarts (worker faults, --resume) picked up
        "resumes": run_folder.resumes(run_dir),  # each --resume, with the recipe changes it accepted
        "labels": recipe.data.labels,  # the label set (per label role for multitask heads)
        "eval": final_eval, "test": test, "baseline": base_target or None,
        "gain": {k: target[k] - base_target[k] for k in ("accuracy", "macro_f1") if k in target and k in base_target},
        "wall_time_s": wall_s, "train_time_s": state["train_time_s"], "eval_time_s": state["eval_time_s"],
        "train_samples_per_s": state["train_samples"] / max(state["train_time_s"], 1e-9),
        "data_wait_fraction": state["data_wait_s"] / max(state["train_time_s"], 1e-9),
        "model_load": state.get("model_load"),  # per worker, the worst rank: seconds, resident memory before and at the peak
        "plan": asdict(state["plan"]),
        "bad_rows_skipped": bad_rows,
        **{section: cls.summary(recipe, state) if getattr(recipe, section, None) else None for section, cls in ADDONS.items()},
        "outputs": {"run_dir": str(run_dir), "model": str(run_dir / run_folder.MODEL), "metrics": str(run_dir / run_folder.METRICS),
                    **({"adapter": str(run_dir / run_folder.ADAPTER)} if (run_dir / run_folder.ADAPTER).is_dir() else {}),
                    "checkpoints": run_folder.shared_run_dir(recipe, run_dir) or str(run_dir)},
    }
    tested = [{"prompt": s["prompt"], "expected": s["expected"], "after": s["answer"]} for s in state.get("test", {}).get("samples", [])]
    generations = {**({"test split": tested} if tested else {}), **state.get("generations", {})}
    if generations:
        run_folder.write_text_atomic(run_dir / run_folder.GENERATIONS, generations_text(recipe, generations))
        summary["outputs"]["generations"] = str(run_dir / run_folder.GENERATIONS)
    plot_files = plots.write_run_plots(run_dir / run_folder.PLOTS, state, recipe, baseline)
    summary["outputs"]["plots"] = [str(p) for p in plot_files]
    run_folder.write_text_atomic(run_dir / run_folder.SUMMARY, json.dumps(summary, indent=2))
    return summary


def generations_text(recipe: Recipe, generations: dict[str, list[dict[str, str]]]) -> str:
    """Markdown: per evaluated set, each prompt with the expected answer (if any) and the model's
    answers before and after training (the test split is scored after training only)."""
    lines = [f"# {recipe.name}: answers to held-out prompts", "",
             "Greedy answers of the base model (before) and the fine-tuned one (after); the first rows of each set."]
    for name, samples in generations.items():
        lines += ["", f"## {name}"]
        for i, sample in enumerate(samples, 1):
            lines += ["", f"**{i}. prompt:** {sample['prompt']}"]
            lines += [f"- {key}: {sample[key]}" for key in ("expected", "before", "after") if key in sample]
    return "\n".join(lines) + "\n"
