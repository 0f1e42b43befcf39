"""``retention.floor``: deliver the fine-tuned model with the most gain whose retention (the
minimum over the run's references, after / before) meets the floor, within ``retention.budget``.

Cheap steps first: one fine-tuning of the recipe as written (``raytune-ft run``'s own run, into the
run folder), swept by WiSE-FT: theta(alpha) between the base and the tuned weights, no new training.
When no alpha meets the floor, or only one that gives up validation score does, a Ray Tune search
(``raytune-ft tune``'s own experiment, in ``search/``) tries mitigations and their strengths (LoRA
rank, frozen depth, L2-SP / EWC strength, replay fraction, the new head's learning rate beside
replay), each trial swept by WiSE-FT too. The head-only baseline, when the run has one, is a
candidate as well (its references scored like any setting's): the floor never delivers less than
training a new head alone.

Honest selection: every setting is judged on validation rows (the task's validation split, each
reference's validation rows) and the delivered one reported on test rows. The run folder gets
``floor.json`` (the delivered setting, every point explored, the gain-vs-retention front),
``plots/floor.png`` and a ``floor`` part in ``summary.json``; ``model/`` is the delivered model,
and is absent when nothing met the floor: then ``FloorNotMet`` (exit code 3) says how close it came.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from raytune_ft import run_folder
from raytune_ft.errors import FloorNotMet, UserError
from raytune_ft.recipe import derived_recipe, floor_metric, given_fields
from raytune_ft.report import plots
from raytune_ft.report.tables import plural
from raytune_ft.schema import Recipe
from raytune_ft.strategies import adaptable_modules, layer_stack
from raytune_ft.tasks import build_task
from raytune_ft.train import runner
from raytune_ft.train.planning import check_strategy, plan_run
from raytune_ft.search import pareto

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = [0.25, 0.5, 0.75, 1.0]  # alpha 0 would be the pretrained body again, not a fine-tuning of it
LORA_RANKS = (4, 16)
# The search's adapters train at 4 x the recipe's lr, unless the recipe's own strategy is LoRA (its lr
# is already an adapter's). Image case: LoRA + replay 0.877 / 0.890 at 1 x, 0.931 / 0.915 at 4 x.
LORA_LR_SCALE = 4.0
# L2-SP / EWC strengths as pulls: the proximal step moves a weight back by about lr_t * lambda of its
# distance from the pretrained one each step, so over a run whose learning rate averages half its
# peak (warmup, then decay) lambda = pull / (lr * steps / 2) pulls it back about `pull` times.
PENALTY_PULLS = (0.5, 2.0, 8.0)
REPLAY_FRACTIONS = (0.1, 0.3)
HEAD_LR = "train.head_lr_scale"
SEARCHED = ("strategy", "regularizer", "replay", HEAD_LR)  # what a search trial sets
SOURCE = "retention.floor"


def run_floor(recipe: Recipe, *, resume: bool = False, force: bool = False, address: str | None = None,
              resume_or_start: bool = False) -> dict[str, Any]:
    """Meet ``recipe.retention.floor`` (see the module's docstring); returns the run's summary,
    whose ``floor`` part names the delivered setting. Raises ``FloorNotMet`` when nothing met it."""
    started = time.perf_counter()
    metric, budget = floor_metric(recipe), recipe.retention.budget
    first = swept(recipe, metric)
    summary = runner.run(first, resume=resume, force=force, address=address, resume_or_start=resume_or_start)
    run_dir = first.run_dir()
    if summary.get("floor"):  # a resumed floor that had finished
        return done(summary)
    baseline = run_folder.finished_summary(run_dir / run_folder.BASELINE)
    points = run_points("fine-tuned", {}, run_dir, summary, metric, baseline)
    reason = search_reason(points, choosing_at(recipe), metric)
    if baseline and baseline.get("retention"):  # a candidate too, but not one that spares the search
        points += run_points("head-only baseline", {}, run_dir / run_folder.BASELINE, baseline,
                             metric, baseline)
    left = None if budget.time_s is None else budget.time_s - (time.perf_counter() - started)
    trials = 0
    if reason and budget.trials and (left is None or left > 0):
        logger.info("retention floor %g: %s; searching mitigations (%d trials%s)", recipe.retention.floor, reason, budget.trials,
                    f", {left:.0f} s left" if left is not None else "")
        experiment = search(first, summary["steps"], run_dir / run_folder.SEARCH, metric, left, resume, address)
        for row in experiment["rows"]:
            trial_dir = run_dir / run_folder.SEARCH / run_folder.TRIALS / row["trial"] / "run"
            trial = run_folder.finished_summary(trial_dir)
            if trial:
                points += run_points(row["trial"], {path: row.get(path) for path in SEARCHED}, trial_dir, trial, metric, baseline)
        trials = len(experiment["rows"])
    elif reason:
        logger.info("retention floor %g: %s; no search (budget: %d trials%s)", recipe.retention.floor, reason, budget.trials,
                    ", no time left" if left is not None and left <= 0 else "")
    summary = deliver(first, summary, points, metric, baseline, trials, time.perf_counter() - started)
    return done(summary)


def done(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary, or ``FloorNotMet`` when its floor was not met."""
    floor = summary["floor"]
    if not floor["met"]:
        raise FloorNotMet(floor["message"])
    return summary


def swept(recipe: Recipe, metric: str) -> Recipe:
    """The recipe with a WiSE-FT sweep that picks the best ``metric`` meeting the floor."""
    wise_ft = dict(given_fields(recipe).get("wise_ft") or {"alphas": DEFAULT_ALPHAS})
    wise_ft.update(metric=metric, min_retention=choosing_at(recipe))
    first = derived_recipe(recipe, {"wise_ft": wise_ft}, SOURCE)
    first._file = recipe.file
    return first


def run_points(setting: str, values: dict[str, Any], run_dir: Path, summary: dict[str, Any], metric: str,
               baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The points a finished run adds, scored on validation rows: one per WiSE-FT alpha (the
    exported one marked), or the run itself when it swept nothing (a body that never trained)."""
    name = metric.removeprefix("eval/")
    base = ((baseline or {}).get("eval") or {}).get(name)
    sweep = summary.get("wise_ft") or {}
    retention = summary.get("retention") or {}
    rows = sweep.get("rows") or [{"alpha": None, metric: (summary.get("eval") or {}).get(name),
                                  **(retention.get("validation") or {}).get("retention", {}), **retention.get("retention", {})}]
    points = []
    for row in rows:
        if row.get(metric) is None or row.get("retention_val/min") is None:
            continue
        points.append({"setting": setting, "values": values, "alpha": row["alpha"], metric: row[metric],
                       "gain": None if base is None else row[metric] - base, "retention": row["retention_val/min"],
                       "test_retention": row.get("retention/min"), "exported": row["alpha"] == sweep.get("alpha"),
                       "run_dir": str(run_dir)})
    return points


def choosing_at(recipe: Recipe) -> float:
    """The validation retention a setting must reach to be chosen: the floor and its guard band."""
    return recipe.retention.floor + recipe.retention.margin


def meeting(points: list[dict[str, Any]], floor: float) -> list[dict[str, Any]]:
    """The points that were exported (so can be delivered) and meet the floor on validation rows."""
    return [point for point in points if point["exported"] and point["retention"] >= floor]


def best(points: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    return max(points, key=lambda point: (point[metric], 1.0 if point["alpha"] is None else point["alpha"])) if points else None


def search_reason(points: list[dict[str, Any]], floor: float, metric: str) -> str | None:
    """Why the first fine-tuning's sweep is not enough (None: it is): no alpha meets the floor, or
    the one that does scores below the fine-tuned model itself, giving up gain a mitigation may keep."""
    met = best(meeting(points, floor), metric)
    if met is None:
        return "no WiSE-FT alpha of the fine-tuned model meets it"
    tuned = [point[metric] for point in points if point["alpha"] in (None, 1.0)]
    if tuned and met[metric] < max(tuned):
        return f"only WiSE-FT alpha {met['alpha']:g} meets it, at {met[metric]:.4f} against the fine-tuned model's {max(tuned):.4f}"
    return None


def penalty_strengths(recipe: Recipe, steps: int) -> list[float]:
    """The lambdas of ``PENALTY_PULLS`` for a run of ``steps`` optimizer steps at the recipe's lr."""
    return [float(f"{pull / (recipe.train.lr * max(steps, 1) / 2):.2g}") for pull in PENALTY_PULLS]


def mitigation_space(recipe: Recipe, steps: int) -> dict[str, list[Any]]:
    """The search's choices per section: the recipe's own and, as far as the model and the
    references allow, frozen depths, LoRA ranks, L2-SP and EWC strengths (for a run of ``steps``
    optimizer steps), replay fractions and, where the run has a head-only baseline training its
    head faster, the new head's lr at the baseline's rate."""
    task = build_task(recipe, recipe.data.labels or [])
    given = given_fields(recipe)
    own = given.get("strategy") or {"method": "full"}
    try:
        depth = len(layer_stack(task.skeleton())[1])
    except UserError:
        depth = 0
    targets = own.get("target_modules") if own.get("method") == "lora" else adaptable_modules(task.skeleton())
    adapter_lr = {} if own.get("method") == "lora" else {"lr_scale": LORA_LR_SCALE}
    strategies = [own, *({"method": "freeze", "layers": k} for k in sorted({max(1, depth // 4), depth // 2, 3 * depth // 4}) if 0 < k < depth),
                  *({"method": "lora", "rank": r, "alpha": 2 * r, **adapter_lr, **({"target_modules": targets} if targets else {})}
                    for r in LORA_RANKS)]
    references = recipe.retention.references
    readout = next((r.name for r in references if r.kind in ("probe", "head")), None)  # EWC's Fisher, replay's targets
    replayable = readout or next((r.name for r in references if r.kind == "task" and r.data.test), None)
    strengths = penalty_strengths(recipe, steps)
    regularizers = [None, given.get("regularizer"), *({"method": "l2sp", "strength": s} for s in strengths),
                    *({"method": "ewc", "strength": s, "reference": readout} for s in strengths if readout)]
    replays = [None, given.get("replay"), *({"fraction": f, "reference": replayable} for f in REPLAY_FRACTIONS if replayable)]
    own_scale = (given.get("train") or {}).get("head_lr_scale", 1.0)
    baseline_scale = float(f"{recipe.baseline.lr / recipe.train.lr:.2g}")
    head_scales = [own_scale, *([baseline_scale] if recipe.baseline.enabled and baseline_scale > own_scale else [])]
    space = {}
    for path, values in (("strategy", strategies), ("regularizer", regularizers), ("replay", replays), (HEAD_LR, head_scales)):
        kept = []
        for value in values:
            if value not in kept and (value is None or fits(recipe, path, value, task)):
                kept.append(value)
        space[path] = kept
    return space


def first_points(space: dict[str, list[Any]], strength: float) -> list[dict[str, Any]]:
    """The settings the search tries first, in order, as far as ``space`` offers them: the remedies
    that kept most of the gain at the floor in the benchmark cases, one or two recipe lines each.
    Replay (the larger fraction) with the recipe's own strategy, its new head at the baseline's rate
    where the space has one (the replayed reference holds the body, and a head at the body's lr
    stayed at the majority class on the text case), and with LoRA rank 16; then half the layers
    frozen with EWC at a pull of 2 (L2-SP where no reference has a readout), then LoRA rank 16 with
    L2-SP at a pull of 2 (``strength``). The random search takes the rest of the budget."""
    strategies, regularizers, replays, scales = space["strategy"], space["regularizer"], space["replay"], space[HEAD_LR]
    lora = next((s for s in strategies if s.get("method") == "lora" and s.get("rank") == max(LORA_RANKS)), None)
    frozen = [s for s in strategies[1:] if s.get("method") == "freeze"]
    half = frozen[len(frozen) // 2] if frozen else None
    pulled = {r["method"]: r for r in regularizers[1:] if r and r["strength"] == strength}
    replay = replays[-1]  # the larger searched fraction (else the recipe's own; None where nothing can be replayed)
    candidates = [(strategies[0], None, replay, scales[-1]), (lora, None, replay, scales[0]),
                  (half, pulled.get("ewc") or pulled.get("l2sp"), None, scales[0]), (lora, pulled.get("l2sp"), None, scales[0])]
    points = []
    for strategy, regularizer, replayed, scale in candidates:
        point = {"strategy": strategy, "regularizer": regularizer, "replay": replayed, HEAD_LR: scale}
        if strategy and (regularizer or replayed) and point not in points:
            points.append(point)
    return points


def fits(recipe: Recipe, path: str, value: Any, task) -> bool:
    """Whether the recipe with ``path`` set to ``value`` validates and, for a strategy, fits the model."""
    try:
        candidate = derived_recipe(recipe, {path: value}, SOURCE)
        if path == "strategy":
            check_strategy(candidate, task)
    except UserError as error:
        logger.debug("retention floor: leaving %s=%s out of the search: %s", path, value, error)
        return False
    return True


def search(first: Recipe, steps: int, search_dir: Path, metric: str, left: float | None, resume: bool, address: str | None) -> dict[str, Any]:
    """The Tune experiment over ``mitigation_space`` (``steps``: the first run's optimizer steps):
    random (seeded by train.seed), each trial the first run's recipe with one choice per section;
    returns its summary."""
    from raytune_ft.search.experiment import run_experiment

    budget = first.retention.budget
    if resume:  # a finished first run was read back, not planned: its labels and model path are not resolved yet
        plan_run(first)
    choices = mitigation_space(first, steps)
    space = {path: {"choice": values} for path, values in choices.items()}
    points = first_points(choices, penalty_strengths(first, steps)[PENALTY_PULLS.index(2.0)])[: budget.trials]
    tune = {"space": space, "points_to_evaluate": points, "num_samples": budget.trials, "max_concurrent_trials": budget.max_concurrent_trials,
            "workers_per_trial": first.scaling.workers, "metric": [metric, "retention/min"], "mode": ["max", "max"],
            "searcher": "random", "seed": first.train.seed, **({"time_budget_s": max(left, 1.0)} if left is not None else {})}
    recipe = derived_recipe(first, {"tune": tune, "baseline.enabled": False, "output.dir": str(search_dir),
                                    "output.storage_path": None, "name": f"{first.name}-floor"}, SOURCE)
    return run_experiment(recipe, resume=resume and (search_dir / run_folder.TRIALS).is_dir(), address=address)


def describe(point: dict[str, Any]) -> str:
    """A point's setting in a few words: ``freeze 2 layers + l2sp 0.1 + replay 0.3, alpha 0.5``."""
    values, parts = point["values"], []
    strategy = values.get("strategy") or {}
    if strategy:
        parts.append(strategy["method"] + (f" {strategy['layers']} layers" if "layers" in strategy else "")
                     + (f" r{strategy['rank']}" if "rank" in strategy else ""))
    if values.get("regularizer"):
        parts.append(f"{values['regularizer']['method']} {values['regularizer']['strength']:g}")
    if values.get("replay"):
        parts.append(f"replay {values['replay']['fraction']:g}")
    if values.get(HEAD_LR) not in (None, 1, 1.0):
        parts.append(f"head lr x{values[HEAD_LR]:g}")
    what = point["setting"] + (f" ({' + '.join(parts)})" if parts else "")
    return what + (f", alpha {point['alpha']:g}" if point["alpha"] is not None else "")


def deliver(first: Recipe, summary: dict[str, Any], points: list[dict[str, Any]], metric: str, baseline: dict[str, Any] | None,
            trials: int, wall_s: float) -> dict[str, Any]:
    """Write ``floor.json``, ``plots/floor.png`` and the summary's ``floor`` part; put the delivered
    model in ``model/`` (none when nothing met the floor); rewrite the report."""
    run_dir, floor, name = first.run_dir(), first.retention.floor, metric.removeprefix("eval/")
    chosen = best(meeting(points, choosing_at(first)), metric)
    for point in points:
        point["label"] = describe(point)
    front = pareto.pareto_front([(x_of(p, metric), p["retention"]) for p in points], ["max", "max"])
    plot = plots.floor_plot(run_dir / run_folder.PLOTS / "floor.png",
                            [{"x": x_of(p, metric), "retention": p["retention"], "label": p["label"]} for p in points], front, floor,
                            points.index(chosen) if chosen else None,
                            f"gain over the head-only baseline (validation {name}, absolute)" if baseline else f"validation {name}",
                            f"{first.name}: retention floor {floor:g}, {len(points)} settings explored")
    result = {"floor": floor, "margin": first.retention.margin, "metric": metric, "met": chosen is not None,
              "budget": first.retention.budget.model_dump(),
              "search_trials": trials, "search": str(run_dir / run_folder.SEARCH) if trials else None, "wall_time_s": wall_s,
              "chosen": delivered(chosen, metric, baseline) if chosen else None,
              "front": [{key: points[i][key] for key in ("label", "alpha", metric, "gain", "retention", "test_retention")}
                        for i in sorted(front, key=lambda i: x_of(points[i], metric))],
              "points": points, "plot": str(plot)}
    if chosen:
        export(Path(chosen["run_dir"]), run_dir)
        test = result["chosen"]["test"]
        result["message"] = (f"{floor:g} met by {chosen['label']}: test {name} {test[name]:.4f}"
                             + (f" (gain {test['gain']:+.4f})" if test.get("gain") is not None else "")
                             + f", retention {test['retention']:.3f} on the references' test rows ({chosen['retention']:.3f} on "
                               f"their validation rows, where it was chosen"
                             + (f" at >= {choosing_at(first):g}, the floor and its margin)" if first.retention.margin else ")"))
    else:
        for folder in (run_folder.MODEL, run_folder.ADAPTER):  # nothing is exported as if it had met the floor
            shutil.rmtree(run_dir / folder, ignore_errors=True)
        summary["outputs"]["model"] = None
        summary["outputs"].pop("adapter", None)
        closest = max(points, key=lambda p: (p["retention"], p[metric])) if points else None
        result["closest"] = closest and {k: closest[k] for k in ("label", metric, "gain", "retention")}
        result["message"] = (f"{floor:g}" + (f" (chosen at {choosing_at(first):g} with its margin)" if first.retention.margin else "")
                             + f" not met within the budget ({plural(trials, 'search trial')}, {wall_s:.0f} s): "
                             + (f"the best retention reached is {closest['retention']:.3f} (validation rows, {closest['label']}), with "
                                + (f"gain {closest['gain']:+.4f}" if closest["gain"] is not None else f"{name} {closest[metric]:.4f}")
                                + f" on {metric}" if closest else "no setting was scored")
                             + f"; no model exported; every setting tried: {run_dir / run_folder.FLOOR}")
    shutil.rmtree(run_dir / run_folder.BASELINE / run_folder.MODEL, ignore_errors=True)  # kept only while it could be delivered
    run_folder.write_text_atomic(run_dir / run_folder.FLOOR, json.dumps(result, indent=2, default=str))
    summary["floor"] = {key: value for key, value in result.items() if key != "points"}
    summary["outputs"]["floor"] = str(run_dir / run_folder.FLOOR)
    summary["outputs"].setdefault("plots", []).append(str(plot))
    run_folder.write_text_atomic(run_dir / run_folder.SUMMARY, json.dumps(summary, indent=2))
    if first.post.report:
        from raytune_ft.report.html import write_report

        write_report(run_dir)
    logger.info("retention floor %s", result["message"])
    return summary


def x_of(point: dict[str, Any], metric: str) -> float:
    """Where a point sits on the gain axis: its gain over the baseline, else its score."""
    return point["gain"] if point["gain"] is not None else point[metric]


def delivered(point: dict[str, Any], metric: str, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """The delivered point with its run's test scores: the target, its gain over the baseline's
    test score, and retention on the references' test rows."""
    name = metric.removeprefix("eval/")
    summary = run_folder.read_summary(Path(point["run_dir"]))
    test = (summary.get("test") or {}).get(name)
    base = ((baseline or {}).get("test") or {}).get(name)
    ratios = (summary.get("retention") or {}).get("retention", {})
    return {**point, "test": {name: test, "gain": None if test is None or base is None else test - base,
                              "retention": ratios.get("retention/min"), "retention_by_reference": ratios}}


def export(source: Path, run_dir: Path) -> None:
    """The delivered run's model (and LoRA adapter) as the run folder's own, when it is a search trial's."""
    if source == run_dir:
        return
    for folder in (run_folder.MODEL, run_folder.ADAPTER):
        if (source / folder).is_dir():
            run_folder.copy_dir_atomic(source / folder, run_dir / folder)
        else:
            shutil.rmtree(run_dir / folder, ignore_errors=True)
