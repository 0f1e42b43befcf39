"""A finished run, in one process: its recipe, task, exported model and data splits.

The post-training steps (compression, fusion, interpretability, the report) work on what a run
left in its directory: ``recipe.yaml`` (labels and model path recorded), ``summary.json`` and the
exported ``model/``. They read a split the way the run's pipeline did (same columns, label ids,
validation hold-out and ``data.max_rows``) without Ray, so a step is a plain CPU process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from raytune_ft import run_folder
from raytune_ft.data import images, tabular
from raytune_ft.errors import UserError
from raytune_ft.recipe import load_recipe
from raytune_ft.schema import DataSection, ModelSection, Recipe
from raytune_ft.tasks import build_task, classification_loss


def read_split_rows(split, data: DataSection, labels: list[str] | None, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One split's rows, columns named by task role and labels encoded, in read order."""
    select = tabular.SelectRows(data.columns, labels, split.holdout, data.validation_fraction, data.other_label)
    drop_bad = tabular.DropBadRows(split, data, tabular.label_roles_of(labels))
    if split.fmt == "images":
        files = images.image_files(split.path)
        raw = ({"image": np.array([f.read_bytes() for f in files[i:i + batch_size]], dtype=object),
                "path": np.array([str(f) for f in files[i:i + batch_size]], dtype=object),
                "label": np.array([f.parent.name for f in files[i:i + batch_size]], dtype=object)}
               for i in range(0, len(files), batch_size))
    else:
        columns = list(data.columns.values())
        raw = ({name: batch.column(name).to_numpy(zero_copy_only=False) for name in columns}
               for batch in tabular.arrow_dataset(split.path, split.fmt).to_batches(columns=columns, batch_size=batch_size))
    remaining = data.max_rows
    for batch in raw:
        rows = drop_bad(select(batch))
        if remaining is not None:
            rows = {key: values[:remaining] for key, values in rows.items()}
            remaining -= len(next(iter(rows.values())))
        if len(next(iter(rows.values()))):
            yield rows
        if remaining is not None and remaining <= 0:
            return


@dataclass
class FinishedRun:
    run_dir: Path
    recipe: Recipe  # as the run recorded it
    summary: dict[str, Any]

    @classmethod
    def open(cls, run_dir: str | Path, overrides: list[str] = ()) -> "FinishedRun":
        """A run directory with ``recipe.yaml``, ``summary.json`` and ``model/``; a clear error otherwise.
        ``overrides`` (``post.prune.sparsity=0.7``) change the recorded recipe for this use only."""
        run_dir = Path(run_dir)
        if run_dir.is_dir():
            for needed in (run_folder.RECIPE, run_folder.SUMMARY, run_folder.MODEL):
                if not (run_dir / needed).exists():
                    raise UserError(str(run_dir / needed), "missing; is this the directory of a finished run?")
        summary = run_folder.read_summary(run_dir)
        return cls(run_dir.resolve(), load_recipe(run_dir / run_folder.RECIPE, overrides), summary)

    @property
    def labels(self) -> list[str]:
        return list(self.recipe.data.labels or [])

    def task(self, model_dir: str | Path | None = None):
        """The run's task, building from ``model_dir`` (default: the run's exported model)."""
        model = ModelSection(path=str(model_dir or self.run_dir / run_folder.MODEL))
        return build_task(self.recipe.model_copy(update={"model": model}), self.recipe.data.labels or [])

    def load_model(self, model_dir: str | Path | None = None) -> torch.nn.Module:
        """The exported model (or another directory the same task exported), in eval mode."""
        return self.task(model_dir).build_model().eval()

    def split(self, name: str = "test"):
        splits, _ = tabular.plan_splits(self.recipe.data)
        for split in splits:
            if split.name == name:
                return split
        raise UserError(f"data.{name}", f"the run has no {name} split; splits: {', '.join(s.name for s in splits)}")

    def batches(self, split: str = "test", batch_size: int = 64, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Model-ready batches of a split: the task's preprocess and collate, no augmentation."""
        task = self.task()
        data = self.recipe.data
        if limit is not None:
            data = data.model_copy(update={"max_rows": min(limit, data.max_rows or limit)})
        for rows in read_split_rows(self.split(split), data, self.labels, batch_size):
            yield task.collate(task.preprocess(rows))

    def rows(self, indices: list[int], split: str = "test", where: str | None = None) -> dict[str, np.ndarray]:
        """The raw rows (columns named by task role, labels encoded) at ``indices`` of a split, in
        that order; a row outside the split is a UserError naming ``where`` (the option that gave it)."""
        wanted = {index: position for position, index in enumerate(indices)}
        picked: dict[int, dict[str, Any]] = {}
        seen = 0
        for rows in read_split_rows(self.split(split), self.recipe.data, self.labels, 256):
            count = len(next(iter(rows.values())))
            for index in range(seen, seen + count):
                if index in wanted:
                    picked[index] = {key: values[index - seen] for key, values in rows.items()}
            seen += count
        missing = [index for index in indices if index not in picked]
        if missing:
            raise UserError(where or f"data.{split}", f"row {missing[0]} is out of range: the {split} split has {seen} rows (0..{seen - 1})")
        columns = picked[indices[0]].keys()
        return {key: np.array([picked[index][key] for index in indices], dtype=object if key in ("text", "image", "path") else None)
                for key in columns}

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, split: str = "test", batch_size: int = 64,
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N, C] and labels [N] of a split."""
        task = self.task()
        logits, labels = [], []
        for batch in self.batches(split, batch_size, limit):
            _, (_, batch_logits) = task.forward(model, batch)
            logits.append(batch_logits.float())
            labels.append(batch["labels"])
        return torch.cat(logits), torch.cat(labels)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """The task's metrics (accuracy, macro-F1, loss, confusion) of given logits."""
        metrics = self.task().new_metrics()
        _, outputs = classification_loss(logits, labels)
        metrics.update(outputs, {"labels": labels})
        return metrics.compute(metrics.state())

    def evaluate(self, model: torch.nn.Module, split: str = "test", batch_size: int = 64, limit: int | None = None) -> dict[str, Any]:
        return self.metrics(*self.predict(model, split, batch_size, limit))
