"""Fusion of several fine-tuned runs: ensembles and model soups (``raytune-ft fuse``).

Ensembles combine the members' predictions: the average of their class probabilities, and a
majority vote of their top classes (a tie goes to the tied class with the most summed
probability). They only need the same task and label set. Soups (Wortsman et al. 2022, "Model
soups") average the members' weights into one model of the same cost; that only makes sense for
checkpoints fine-tuned from one initialisation, such as the trials of a tune experiment. The
uniform soup averages every member; the greedy soup ranks the members by validation accuracy and
adds each only if the soup's validation accuracy does not drop.

Everything is evaluated on the first member's validation and test splits, each member through
its own task (tokenizer, max_length), so all predictions are of the same rows. Validation picks the
greedy soup's members; test is reported, never used to choose.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from raytune_ft import run_folder
from raytune_ft.errors import UserError
from raytune_ft.post.finished import FinishedRun
from raytune_ft.tasks import export_pretrained

logger = logging.getLogger(__name__)

SPLITS = ("validation", "test")


@dataclasses.dataclass
class Member:
    name: str
    run: FinishedRun  # reading the first member's data
    model: torch.nn.Module
    probabilities: dict[str, torch.Tensor]  # split -> [N, C], float64
    scores: dict[str, dict[str, Any]]  # split -> metrics


def tune_trials(experiment_dir: Path, top: int) -> list[Path]:
    """The run directories of a tune experiment's ``top`` finished trials, best first by its
    (first) metric and mode."""
    summary_path = Path(experiment_dir) / run_folder.SUMMARY
    if not summary_path.is_file():
        raise UserError("--tune", f"{experiment_dir} holds no finished tune experiment (no summary.json); "
                                  "give the output.dir of raytune-ft tune")
    try:
        summary = json.loads(summary_path.read_text())
        metric, mode, rows = summary["metrics"][0], summary["modes"][0], summary["rows"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(str(summary_path), "not a tune experiment's summary (metrics, modes, rows)") from None
    finished = [row for row in rows if row.get("status") == "ok" and isinstance(row.get(metric), (int, float))]
    if len(finished) < top:
        raise UserError("--top", f"{top} trials asked for, but {experiment_dir} has {len(finished)} finished trials with {metric}")
    ranked = sorted(finished, key=lambda row: row[metric], reverse=mode == "max")
    return [Path(experiment_dir) / run_folder.TRIALS / row["trial"] / "run" for row in ranked[:top]]


def open_runs(run_dirs: list[Path]) -> list[FinishedRun]:
    runs: list[FinishedRun] = []
    for run_dir in run_dirs:
        run = FinishedRun.open(run_dir)
        if any(run.run_dir == other.run_dir for other in runs):
            raise UserError(str(run_dir), "given twice; each run is one member")
        runs.append(run)
    if len(runs) < 2:
        raise UserError("fuse", f"{len(runs)} run given; fusion needs at least 2 (run directories, or --tune with --top)")
    return runs


def architecture(run: FinishedRun) -> dict[str, tuple[int, ...]]:
    """The exported model's tensor names and shapes, from its config alone (no weights read)."""
    return {key: tuple(value.shape) for key, value in run.task().skeleton().state_dict().items()}


def check_compatible(runs: list[FinishedRun], soups: bool) -> None:
    """Same task and labels (ensembles); also the same tensors and shapes (soups)."""
    first = runs[0]
    for run in runs[1:]:
        if run.recipe.task.type != first.recipe.task.type:
            raise UserError(str(run.run_dir), f"task {run.recipe.task.type} differs from {first.recipe.task.type} "
                                              f"of {first.run_dir}; members must do the same task")
        if run.labels != first.labels:
            raise UserError(str(run.run_dir), f"labels {run.labels} differ from {first.labels} of {first.run_dir}; "
                                              "members must predict the same classes in the same order")
    if not soups:
        return
    shapes = architecture(first)
    for run in runs[1:]:
        other = architecture(run)
        if other != shapes:
            key = next(key for key in [*shapes, *other] if shapes.get(key) != other.get(key))
            raise UserError(str(run.run_dir / "model"), f"a different architecture from {first.run_dir / 'model'} "
                                                        f"(tensor {key}: {other.get(key, 'absent')} vs {shapes.get(key, 'absent')}); "
                                                        "soups average the weights of one architecture; pass --no-soups to ensemble only")


def member_names(runs: list[FinishedRun]) -> list[str]:
    """Short names: the run directory's name (a tune trial's id); full paths where those repeat."""
    names = [run.run_dir.parent.name if run.run_dir.name == "run" else run.run_dir.name for run in runs]
    return names if len(set(names)) == len(names) else [str(run.run_dir) for run in runs]


def evaluate_members(runs: list[FinishedRun]) -> tuple[list[Member], dict[str, torch.Tensor]]:
    """Each member's probabilities and scores on the first run's splits; the splits' labels."""
    first = runs[0]
    members, labels = [], {}
    for i, (name, run) in enumerate(zip(member_names(runs), runs)):
        logger.info("fuse: member %d/%d %s", i + 1, len(runs), name)
        if run.recipe.data != first.recipe.data:
            logger.warning("note: %s was trained on other data; it is scored on %s's splits", name, first.run_dir.name)
        view = dataclasses.replace(run, recipe=run.recipe.model_copy(update={"data": first.recipe.data}))
        model = run.load_model()
        probabilities, scores = {}, {}
        for split in SPLITS:
            logits, labels[split] = view.predict(model, split)  # same rows and label ids for every member
            probabilities[split] = logits.double().softmax(-1)
            scores[split] = first.metrics(logits, labels[split])
        members.append(Member(name, view, model, probabilities, scores))
    return members, labels


def average_probabilities(probabilities: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(probabilities).mean(0)  # [M, N, C] -> [N, C]


def majority_vote(probabilities: list[torch.Tensor]) -> torch.Tensor:
    """Each member's top class; among the classes with the most votes, the highest summed probability."""
    stacked = torch.stack(probabilities)  # [M, N, C]
    votes = torch.nn.functional.one_hot(stacked.argmax(-1), stacked.shape[-1]).sum(0)  # [N, C]
    tied = votes == votes.max(-1, keepdim=True).values
    return torch.where(tied, stacked.sum(0), -torch.inf).argmax(-1)  # [N]


def ensembles(first: FinishedRun, members: list[Member], labels: dict[str, torch.Tensor]) -> dict[str, Any]:
    result: dict[str, Any] = {"average": {}, "vote": {}}
    for split in SPLITS:
        probabilities = [member.probabilities[split] for member in members]
        result["average"][split] = first.metrics(average_probabilities(probabilities).log(), labels[split])
        votes = majority_vote(probabilities)
        one_hot = torch.nn.functional.one_hot(votes, len(first.labels)).double()
        result["vote"][split] = {**first.metrics(one_hot, labels[split]), "loss": None}  # a vote has no likelihood
    return result


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each floating-point tensor's mean, summed in float64 (identical members average to
    themselves exactly); other tensors (integer buffers such as position ids) from the first."""
    return {key: (sum(state[key].double() for state in states) / len(states)).to(value.dtype)
            if value.is_floating_point() else value
            for key, value in states[0].items()}


def soups(first: FinishedRun, members: list[Member], directory: Path) -> dict[str, Any]:
    """The uniform and the greedy soup, scored and saved under ``directory``."""
    task, soup = first.task(), first.load_model()

    def score(ingredients: list[Member], splits=SPLITS) -> dict[str, Any]:
        soup.load_state_dict(average_weights([member.model.state_dict() for member in ingredients]))
        return {split: first.evaluate(soup, split) for split in splits}

    def save(name: str, ingredients: list[Member], scores: dict[str, Any], **extra) -> dict[str, Any]:
        export_pretrained(task, soup, str(directory / name))  # the soup ``score`` loaded last
        return {"members": [member.name for member in ingredients], **scores, "model": name, **extra}

    logger.info("fuse: uniform soup of %d", len(members))
    uniform = save("uniform_soup", members, score(members))

    ranked = sorted(members, key=lambda member: member.scores["validation"]["accuracy"], reverse=True)
    ingredients, best = ranked[:1], ranked[0].scores["validation"]
    steps = [{"add": ranked[0].name, "validation_accuracy": best["accuracy"], "kept": True}]
    for member in ranked[1:]:
        candidate = score([*ingredients, member], ["validation"])["validation"]
        kept = candidate["accuracy"] >= best["accuracy"]
        logger.info("fuse: greedy soup + %s: validation accuracy %.4f (%s)", member.name, candidate["accuracy"], "kept" if kept else "dropped")
        steps.append({"add": member.name, "validation_accuracy": candidate["accuracy"], "kept": kept})
        if kept:
            ingredients, best = [*ingredients, member], candidate
    greedy = save("greedy_soup", ingredients, {"validation": best, **score(ingredients, ["test"])}, steps=steps)
    return {"uniform": uniform, "greedy": greedy}


def check_output(output: Path, force: bool, members: list[Path]) -> None:
    """Never overwrite: an existing output needs --force, which moves it aside at the end; never a
    folder of the user's own, nor one holding a member run."""
    run_folder.check_own_folder(output, [("a member run", member) for member in members], field="--output")
    if output.exists() and not output.is_dir():
        raise UserError("--output", f"{output} is a file; give a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UserError("--output", f"{output} already exists; pass --force to move it aside")


def fuse(run_dirs: list[Path], output: Path, *, force: bool = False, with_soups: bool = True) -> dict[str, Any]:
    """Ensembles (and soups) of finished runs; writes ``output``/fusion.json, fusion.md and the soups.
    Built in a hidden sibling directory and renamed at the end: ``output`` appears whole or not at all."""
    output = Path(output).resolve()
    check_output(output, force, run_dirs)
    runs = open_runs(run_dirs)
    check_compatible(runs, with_soups)
    partial = output.with_name(f".{output.name}.partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)  # our own leftover from a fuse cut short
        partial.mkdir(parents=True)
    except OSError as error:
        raise UserError("--output", f"cannot write next to {output} ({error.strerror})") from None

    members, labels = evaluate_members(runs)
    first = runs[0]
    result = {
        "data": {"run": str(first.run_dir), **{split: len(labels[split]) for split in SPLITS}},
        "members": [{"name": member.name, "run_dir": str(run.run_dir), **member.scores,
                     "trained_on_this_data": run.recipe.data == first.recipe.data}
                    for member, run in zip(members, runs)],
        "ensembles": ensembles(first, members, labels),
    }
    if with_soups:
        result["soups"] = soups(first, members, partial)
    (partial / "fusion.json").write_text(json.dumps(result, indent=2) + "\n")
    (partial / "fusion.md").write_text(fusion_markdown(result))
    if output.is_dir() and any(output.iterdir()):
        run_folder.move_aside(output)
    os.replace(partial, output)  # onto nothing, or an empty directory
    return result


def fusion_markdown(result: dict[str, Any]) -> str:
    """One row per member, ensemble and soup: validation and test accuracy and macro-F1."""
    rows = [(f"member {m['name']}", "-", m) for m in result["members"]]
    rows += [("ensemble: average of probabilities", "all", result["ensembles"]["average"]),
             ("ensemble: majority vote", "all", result["ensembles"]["vote"])]
    for kind, soup in result.get("soups", {}).items():
        rows.append((f"{kind} soup ({soup['model']}/)", ", ".join(soup["members"]), soup))
    data = result["data"]
    lines = [
        "# Fusion",
        "",
        f"Scored on the splits of {data['run']} ({data['validation']} validation, {data['test']} test rows); "
        "the greedy soup chooses its members on validation.",
        "",
        "| model | members | val accuracy | val macro-F1 | test accuracy | test macro-F1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, used, scores in rows:
        lines.append(f"| {name} | {used} | {scores['validation']['accuracy']:.4f} | {scores['validation']['macro_f1']:.4f} "
                     f"| {scores['test']['accuracy']:.4f} | {scores['test']['macro_f1']:.4f} |")
    return "\n".join(lines) + "\n"
