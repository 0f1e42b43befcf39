"""The ``distill`` add-on: the model trains as a student of a fine-tuned teacher.

Driver side, ``plan`` checks ``distill.teacher``: a finished run of the same task and label set,
whose model reads the training rows exactly as the student does (one tokenizer), and records its
run directory in the recipe. On every worker, ``Teacher`` holds the teacher frozen in eval mode on
the backend's device; the objective becomes (1 - alpha) * the task's hard-label loss + its
soft-target term alpha * T^2 * KL(softmax(t/T) || softmax(s/T)). T^2 keeps the soft term's gradients on
the scale of the hard term's as T changes (Hinton et al. 2015). Everything else is an ordinary run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raytune_ft import run_folder
from raytune_ft.addons import AddOn, register
from raytune_ft.errors import UserError
from raytune_ft.evaluation import all_reduce_sum, evaluate, numbers
from raytune_ft.post.finished import FinishedRun, read_split_rows
from raytune_ft.schema import ModelSection, Recipe
from raytune_ft.tasks import build_task

FIELD = "distill.teacher"


def teacher_task(recipe: Recipe, labels: list[str]):
    """The run's task (its preprocessing options) building from the teacher's exported model."""
    teacher_model = ModelSection(path=str(Path(recipe.distill.teacher) / run_folder.MODEL))
    return build_task(recipe.model_copy(update={"model": teacher_model}), labels)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def finished_teacher(path: str) -> FinishedRun:
    """The teacher's FinishedRun from its run directory or its ``model/`` directory."""
    given = Path(path).expanduser()
    try:  # a name the file system refuses (too long, say) raises here rather than reading as absent
        run_dir = given.parent if given.name == run_folder.MODEL and (given.parent / run_folder.RECIPE).is_file() else given
        if not run_dir.is_dir():
            raise UserError(FIELD, f"{path} not found; give the output.dir of a finished run (or its model/ directory)")
        missing = [name for name in (run_folder.RECIPE, run_folder.SUMMARY, run_folder.MODEL) if not (run_dir / name).exists()]
    except OSError as error:
        raise UserError(FIELD, f"{path[:80]}{'...' if len(path) > 80 else ''}: {error.strerror}") from None
    if missing:
        raise UserError(FIELD, f"{path} is not a finished run (no {', '.join(missing)}); give the output.dir of a finished run "
                               "(or its model/ directory)")
    try:
        return FinishedRun.open(run_dir)
    except UserError as error:
        raise UserError(FIELD, f"{run_dir}: {' '.join(str(error).split())}") from None


def plan_teacher(recipe: Recipe, labels: list[str], student, train_split) -> None:
    """Driver-side checks of ``distill.teacher``; records the teacher's resolved run directory."""
    teacher = finished_teacher(recipe.distill.teacher)
    if teacher.recipe.task.type != recipe.task.type:
        raise UserError(FIELD, f"{teacher.run_dir} is a {teacher.recipe.task.type} run; this run is {recipe.task.type}")
    if teacher.labels != labels:
        raise UserError(FIELD, f"{teacher.run_dir} has labels {teacher.labels}; this run has {labels} "
                               "(the same labels in the same order: the teacher's logits must mean the same classes)")
    recipe.distill.teacher = str(teacher.run_dir)
    task = teacher_task(recipe, labels)
    try:
        task.check()
    except UserError as error:
        raise UserError(FIELD, error.message) from None
    rows = next(read_split_rows(train_split, recipe.data, labels, batch_size=16), None)
    if rows is not None:
        mine, theirs = student.preprocess(rows), task.preprocess(rows)
        if any(not np.array_equal(a, b) for key in mine for a, b in zip(mine[key], theirs[key])):
            raise UserError(FIELD, f"{teacher.run_dir}/model reads the data differently from {recipe.model.path} "
                                   "(another tokenizer?); the teacher sees the student's batches, so they must read them alike")


@register
class Teacher(AddOn):
    """The frozen teacher on one worker, and the soft-target loss against its logits."""

    section = "distill"

    @classmethod
    def plan(cls, recipe, task, splits):
        plan_teacher(recipe, recipe.data.labels or [], task, next(split for split in splits if split.name == "train"))

    def __init__(self, loop):
        super().__init__(loop)
        spec = loop.recipe.distill
        self.temperature, self.alpha = spec.temperature, spec.alpha
        labels = loop.recipe.data.labels or []
        self.model = teacher_task(loop.recipe, labels).build_model().eval().requires_grad_(False).to(loop.backend.device)
        self.kl_sum = torch.zeros(2, dtype=torch.float64)  # (summed KL, rows) of this epoch

    def objective(self, objective, step):
        """(1 - alpha) * objective + alpha * T^2 * KL(teacher || student), mean over the batch.
        ``step.outputs``: the student's classification outputs (summed loss, logits [B, C] with their graph)."""
        _, student_logits = step.outputs
        with torch.no_grad():
            _, (_, teacher_logits) = self.loop.task.forward(self.model, step.batch)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                      log_target=True, reduction="batchmean")
        self.kl_sum += torch.tensor([float(kl.detach()) * len(student_logits), len(student_logits)], dtype=torch.float64)
        return (1 - self.alpha) * objective + self.alpha * t * t * kl

    def end_epoch(self, record, state):
        """``train/distill_kl``: the epoch's mean KL(teacher || student) at T over every rank's rows."""
        total = all_reduce_sum(self.kl_sum)
        self.kl_sum = torch.zeros(2, dtype=torch.float64)
        record["train/distill_kl"] = float(total[0] / total[1].clamp(min=1))

    def final(self, state):
        """The teacher on the same test shards: the student's score is exactly comparable."""
        loop = self.loop
        state["teacher_test"] = numbers(evaluate(loop.task, self.model, loop.shards.get("test"), loop.eval_batch, loop.backend))

    @classmethod
    def summary(cls, recipe, state):
        return distill_summary(recipe, recipe.data.labels or [], state)


def distill_summary(recipe: Recipe, labels: list[str], state: dict[str, Any]) -> dict[str, Any]:
    """Teacher and student side by side: test metrics on this run's test split (the teacher's
    also as its own run recorded them) and parameter counts."""
    teacher_dir = Path(recipe.distill.teacher)
    recorded = (run_folder.finished_summary(teacher_dir) or {}).get("test") or {}
    student_test, teacher_test = state.get("test", {}), state.get("teacher_test", {})
    sizes = {
        "student": parameter_count(build_task(recipe, labels).skeleton()),
        "teacher": parameter_count(teacher_task(recipe, labels).skeleton()),
    }
    return {
        "temperature": recipe.distill.temperature, "alpha": recipe.distill.alpha,
        "teacher": {"run_dir": str(teacher_dir), "parameters": sizes["teacher"], "test": numbers(teacher_test),
                    "recorded_test": numbers(recorded)},
        "student": {"parameters": sizes["student"], "test": numbers(student_test)},
        "size_ratio": sizes["teacher"] / sizes["student"],
        "delta": {k: student_test[k] - teacher_test[k] for k in ("accuracy", "macro_f1") if k in student_test and k in teacher_test},
    }
