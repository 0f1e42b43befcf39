"""Knowledge distillation: the model trains as a student of a fine-tuned teacher (``distill:``).

Driver side, ``plan_teacher`` checks ``distill.teacher``: a finished run of the same task and label
set, whose model reads the training rows exactly as the student does (one tokenizer), and records
its run directory in the recipe. On every worker, ``Teacher`` holds the teacher frozen in eval mode
on the backend's device; the loop adds its soft-target term alpha * T^2 * KL(softmax(t/T) ||
softmax(s/T)) to (1 - alpha) * the task's hard-label loss. T^2 keeps the soft term's gradients on
the scale of the hard term's as T changes (Hinton et al. 2015). Everything else is an ordinary run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raytune_ft.errors import UserError

FIELD = "distill.teacher"


def teacher_task(recipe: dict[str, Any], labels: list[str]):
    """The run's task (its preprocessing options) building from the teacher's exported model."""
    from raytune_ft.tasks import build_task

    return build_task({**recipe, "model": {"path": str(Path(recipe["distill"]["teacher"]) / "model")}}, labels)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if isinstance(value, (int, float))}


def finished_teacher(path: str):
    """The teacher's FinishedRun from its run directory or its ``model/`` directory."""
    from raytune_ft.post.finished import FinishedRun

    given = Path(path).expanduser()
    run_dir = given.parent if given.name == "model" and (given.parent / "recipe.yaml").is_file() else given
    if not run_dir.is_dir():
        raise UserError(FIELD, f"{path} not found; give the output.dir of a finished run (or its model/ directory)")
    missing = [name for name in ("recipe.yaml", "summary.json", "model") if not (run_dir / name).exists()]
    if missing:
        raise UserError(FIELD, f"{path} is not a finished run (no {', '.join(missing)}); give the output.dir of a finished run "
                               "(or its model/ directory)")
    try:
        return FinishedRun.open(run_dir)
    except UserError as error:
        raise UserError(FIELD, f"{run_dir}: {' '.join(str(error).split())}") from None


def plan_teacher(recipe, labels: list[str], student, train_split) -> None:
    """Driver-side checks of ``distill.teacher``; records the teacher's resolved run directory."""
    from raytune_ft.post.finished import read_split_rows

    teacher = finished_teacher(recipe.distill.teacher)
    if teacher.recipe.task.type != recipe.task.type:
        raise UserError(FIELD, f"{teacher.run_dir} is a {teacher.recipe.task.type} run; this run is {recipe.task.type}")
    if teacher.labels != labels:
        raise UserError(FIELD, f"{teacher.run_dir} has labels {teacher.labels}; this run has {labels} "
                               "(the same labels in the same order: the teacher's logits must mean the same classes)")
    recipe.distill.teacher = str(teacher.run_dir)
    task = teacher_task(recipe.to_dict(), labels)
    try:
        task.check()
    except UserError as error:
        raise UserError(FIELD, error.message) from None
    rows = next(read_split_rows(train_split, recipe.data.model_dump(), labels, batch_size=16), None)
    if rows is not None:
        mine, theirs = student.preprocess(rows), task.preprocess(rows)
        if any(not np.array_equal(a, b) for key in mine for a, b in zip(mine[key], theirs[key])):
            raise UserError(FIELD, f"{teacher.run_dir}/model reads the data differently from {recipe.model.path} "
                                   "(another tokenizer?); the teacher sees the student's batches, so they must read them alike")


class Teacher:
    """The frozen teacher on one worker, and the soft-target loss against its logits."""

    def __init__(self, recipe: dict[str, Any], labels: list[str], device):
        spec = recipe["distill"]
        self.temperature, self.alpha = spec["temperature"], spec["alpha"]
        self.model = teacher_task(recipe, labels).build_model().eval().requires_grad_(False).to(device)
        self.kl_sum = torch.zeros(2, dtype=torch.float64)  # (summed KL, rows) of this epoch

    def loss(self, task, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """alpha * T^2 * KL(teacher || student), mean over the batch. ``outputs``: the student's
        classification outputs from ``task.forward`` (summed loss, logits [B, C] with their graph)."""
        _, student_logits = outputs
        with torch.no_grad():
            _, (_, teacher_logits) = task.forward(self.model, batch)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                      log_target=True, reduction="batchmean")
        self.kl_sum += torch.tensor([float(kl.detach()) * len(student_logits), len(student_logits)], dtype=torch.float64)
        return self.alpha * t * t * kl

    def epoch_metrics(self) -> dict[str, float]:
        """``train/distill_kl``: the epoch's mean KL(teacher || student) at T over every rank's rows."""
        from raytune_ft.train.loop import all_reduce_sum

        total = all_reduce_sum(self.kl_sum)
        self.kl_sum = torch.zeros(2, dtype=torch.float64)
        return {"train/distill_kl": float(total[0] / total[1].clamp(min=1))}


def distill_summary(recipe, labels: list[str], state: dict[str, Any]) -> dict[str, Any] | None:
    """Teacher and student side by side: test metrics on this run's test split (the teacher's
    also as its own run recorded them) and parameter counts."""
    from raytune_ft.tasks import build_task

    if recipe.distill is None:
        return None
    teacher_dir = Path(recipe.distill.teacher)
    recorded = json.loads((teacher_dir / "summary.json").read_text()).get("test") or {}
    student_test, teacher_test = state.get("test", {}), state.get("teacher_test", {})
    sizes = {
        "student": parameter_count(build_task(recipe.to_dict(), labels).skeleton()),
        "teacher": parameter_count(teacher_task(recipe.to_dict(), labels).skeleton()),
    }
    return {
        "temperature": recipe.distill.temperature, "alpha": recipe.distill.alpha,
        "teacher": {"run_dir": str(teacher_dir), "parameters": sizes["teacher"], "test": numbers(teacher_test),
                    "recorded_test": numbers(recorded)},
        "student": {"parameters": sizes["student"], "test": numbers(student_test)},
        "size_ratio": sizes["teacher"] / sizes["student"],
        "delta": {k: student_test[k] - teacher_test[k] for k in ("accuracy", "macro_f1") if k in student_test and k in teacher_test},
    }
