"""The ``retention`` add-on: reference evaluations of the original capability, scored on the
base model before training and again at every evaluation, on every worker and reduced.

``probe``: embed a labelled reference set with the model's encoder (the task's ``embed``: pooled
features, no head), fit a multinomial logistic-regression probe on the reference train split and
score it on the reference test split. The probe is refit at every evaluation, so it measures what
the features still encode, not whether one fixed readout still fits. The probe fitted on the base
model (the "original probe") is kept: replay trains against it and EWC takes its Fisher from it.

``head``: the base model's own classifier head, fixed as pretrained, read on the current features
of a set labelled in the base model's labels: accuracy on the original classes with the original
head. Replay and EWC use it as they use the original probe.

``task``: the task's own metrics on a reference set of the task's kind (WER on real speech for
ASR), with the model as it is; nothing is fitted. Retention compares the metrics the task's
Metrics declare ``retained`` (higher is better: accuracy; for speech word_accuracy = max(0, 1 - WER)).

``drift`` (language models): prompts the base model answers greedily before training (the task's
``generate``); at every evaluation, the likelihood of those answers under the current model,
``answer_likelihood`` = exp(-mean token NLL): how far the model's answers to general prompts have
moved from the base model's. ``choice``: questions with choices (a knowledge set), each choice
scored as the answer by its mean token log-likelihood; ``accuracy`` is the share of questions whose
likeliest choice is the right one.

Driver side, ``plan`` checks every reference's data and label set and ``datasets`` prepares its
splits (materialised: small, and read at every evaluation).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raytune_ft.addons import AddOn, register
from raytune_ft.data import tabular
from raytune_ft.errors import UserError
from raytune_ft.evaluation import Collate, all_reduce_sum, distributed, evaluate, gather_rows, in_lockstep, scoring_batches
from raytune_ft.schema import Recipe
from raytune_ft.tasks import ClassificationMetrics, build_task

logger = logging.getLogger(__name__)

PROBE_ITERATIONS = 100
PROBE_L2 = 1e-3


@dataclass
class Probe:
    """A linear readout on standardised features: logits = ((x - mean) / std) @ weight + bias."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        features = (features.to(self.weight.dtype) - self.mean) / self.std
        return features @ self.weight + self.bias

    @classmethod
    def from_head(cls, weight: torch.Tensor, bias: torch.Tensor) -> "Probe":
        """A classifier head ``features @ weight.T + bias`` as a probe (no standardisation)."""
        features = weight.shape[1]
        return cls(torch.zeros(features, dtype=torch.float64), torch.ones(features, dtype=torch.float64),
                   weight.double().T.contiguous(), bias.double())

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, classes: int) -> "Probe":
        """L2-regularised multinomial logistic regression, full-batch L-BFGS in float64 (deterministic)."""
        features = features.double()
        mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
        x = (features - mean) / std
        weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ weight + bias, labels) + PROBE_L2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return cls(mean, std, weight.detach(), bias.detach())

    def tensors(self) -> list[torch.Tensor]:
        return [self.mean, self.std, self.weight, self.bias]

    def broadcast(self) -> "Probe":
        if distributed():
            for tensor in self.tensors():
                dist.broadcast(tensor, src=0)
        return self


class Reference:
    """One probe or head reference: its task (for collation and ``embed``), label count, worker
    shards and, for ``head``, the base model's own head (then nothing is fitted)."""

    def __init__(self, name: str, task, classes: int, shards: dict[str, Any], batch_size: int, head: Probe | None = None):
        self.name, self.task, self.classes, self.shards, self.batch_size = name, task, classes, shards, batch_size
        self.head = head
        self.original_probe: Probe | None = None
        self.before: dict[str, float] = {}

    def features(self, backend, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and labels of this rank's shard of ``split``, gathered from every rank.
        Shards differ in length: with partitioned parameters every forward is a collective, so the
        ranks run them in lockstep."""
        module, rows, labels = backend.module, [], []
        was_training = module.training
        module.eval()
        batches = self.shards[split].iter_torch_batches(batch_size=self.batch_size, collate_fn=Collate(self.task))
        with torch.no_grad():
            for batch, counts in in_lockstep(batches, backend.partitioned):
                batch = {key: value.to(backend.device) for key, value in batch.items()}
                features = self.task.embed(module, batch).float().cpu()
                if counts:
                    rows.append(features)
                    labels.append(batch["labels"].cpu())
        module.train(was_training)
        local = torch.cat(rows) if rows else torch.zeros(0, 1)
        local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        return gather_rows(local), gather_rows(local_labels)

    def score(self, backend) -> tuple[dict[str, float], Probe]:
        """Accuracy and macro-F1 on the test split: the fixed head's, or a probe's refitted on the
        current features."""
        test_x, test_y = self.features(backend, "test")
        probe = self.head if self.head is not None else self.refit(backend)
        metrics = ClassificationMetrics(self.classes)
        logits = probe.logits(test_x)
        metrics.update((torch.tensor(0.0), logits), {"labels": test_y})
        result = metrics.compute(metrics.state())
        return {key: result[key] for key in self.retained()}, probe

    def refit(self, backend) -> Probe:
        """A probe fitted on the train split's current features; rank 0 fits, every rank gets it."""
        train_x, train_y = self.features(backend, "train")
        if not distributed() or dist.get_rank() == 0:
            return Probe.fit(train_x, train_y, self.classes).broadcast()
        dims = train_x.shape[1]  # shapes for the broadcast
        return Probe(*(torch.zeros(shape, dtype=torch.float64) for shape in ((dims,), (dims,), (dims, self.classes), (self.classes,)))).broadcast()

    def retained(self) -> tuple[str, ...]:
        return ("accuracy", "macro_f1")

    def local_rows(self) -> dict[str, np.ndarray]:
        return local_rows(self.shards["train"])


def local_rows(shard) -> dict[str, np.ndarray]:
    """This rank's preprocessed rows of ``shard``, read once by the caller and kept (small)."""
    parts = list(shard.iter_batches(batch_size=256, batch_format="numpy"))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]} if parts else {}


def joined_samples(before: list[dict[str, str]], after: list[dict[str, str]]) -> list[dict[str, str]]:
    """Answers to the same prompts before and after training, side by side."""
    later = {sample["prompt"]: sample["answer"] for sample in after}
    return [{"prompt": s["prompt"], **({"expected": s["expected"]} if s.get("expected") else {}), "before": s["answer"],
             "after": later.get(s["prompt"], "")} for s in before]


class TaskReference:
    """The task's own metrics on a reference set (its ``test`` shard), reduced over ranks; its
    ``train`` shard, when replay reads it, is the rows replayed."""

    original_probe = None

    def __init__(self, name: str, task, shards: dict[str, Any], batch_size: int):
        self.name, self.task, self.shards, self.batch_size = name, task, shards, batch_size
        self.before: dict[str, float] = {}
        self.answers: list[dict[str, str]] = []  # the last score's generated answers (rank 0's first rows)
        self.answers_before: list[dict[str, str]] = []  # the base model's

    def score(self, backend) -> tuple[dict[str, float], None]:
        result = evaluate(self.task, backend.module, self.shards["test"], self.batch_size, backend)
        self.answers = result.get("samples", [])
        return {key: value for key, value in result.items() if isinstance(value, float)}, None

    def retained(self) -> tuple[str, ...]:
        return self.task.new_metrics().retained

    def local_rows(self) -> dict[str, np.ndarray]:
        return local_rows(self.shards["train"])


class DriftReference:
    """Prompts the base model answered greedily (this rank's share, answered at the first score:
    the base model's); scored by the likelihood of those answers under the current model."""

    original_probe = None

    def __init__(self, name: str, task, shard, batch_size: int):
        self.name, self.task, self.shard, self.batch_size = name, task, shard, batch_size
        self.before: dict[str, float] = {}
        self.rows: dict[str, np.ndarray] | None = None
        self.answers: list[dict[str, str]] = []

    def answer(self, backend) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
        """This rank's prompts with the current model's greedy answers (scored: the answers), and
        the first of them as text."""
        tokenizer = self.task.tokenizer()
        ids, scored, samples = [], [], []
        batches = self.shard.iter_torch_batches(batch_size=self.batch_size, collate_fn=Collate(self.task))
        for batch, counts in scoring_batches(batches, backend.module, backend):
            answers = self.task.generate(backend.module, batch)
            if not counts:
                continue
            for row, answer in enumerate(answers):  # every row of a drift set is a prompt
                prompt = batch["input_ids"][row, : int(batch["prompt_length"][row])].cpu().numpy()
                ids.append(np.concatenate([prompt, answer]).astype(np.int32))
                scored.append(np.concatenate([np.zeros(len(prompt), np.int8), np.ones(len(answer), np.int8)]))
                if len(samples) < 24:
                    samples.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True).strip(),
                                    "answer": tokenizer.decode(answer, skip_special_tokens=True).strip()})
        rows = {"input_ids": np.empty(len(ids), dtype=object), "scored": np.empty(len(ids), dtype=object),
                "prompt_length": np.zeros(len(ids), dtype=np.int64)}
        rows["input_ids"][:], rows["scored"][:] = ids, scored
        return rows, samples

    def score(self, backend) -> tuple[dict[str, float], None]:
        if self.rows is None:  # the first score is the base model's: its answers are the set
            self.rows, self.answers = self.answer(backend)
        sums = torch.zeros(2, dtype=torch.float64)
        count = len(self.rows["input_ids"])
        batches = (self.task.collate({key: values[start: start + self.batch_size] for key, values in self.rows.items()})
                   for start in range(0, count, self.batch_size))
        for batch, counts in scoring_batches(batches, backend.module, backend):
            nll, tokens = self.task.sequence_nll(backend.module, batch)
            if counts:
                sums += torch.tensor([float(nll.sum()), float(tokens.sum())], dtype=torch.float64)
        nll, tokens = all_reduce_sum(sums).tolist()
        mean = nll / max(tokens, 1)
        return {"answer_nll": mean, "answer_likelihood": math.exp(-mean)}, None

    def retained(self) -> tuple[str, ...]:
        return ("answer_likelihood",)


class ChoiceReference:
    """Questions with choices: each choice scored as the answer by its mean token NLL (gathered
    from every rank: a question's choices may sit on different ranks); accuracy of the likeliest."""

    original_probe = None

    def __init__(self, name: str, task, shard, batch_size: int):
        self.name, self.task, self.shard, self.batch_size = name, task, shard, batch_size
        self.before: dict[str, float] = {}

    def score(self, backend) -> tuple[dict[str, float], None]:
        rows = []
        batches = self.shard.iter_torch_batches(batch_size=self.batch_size, collate_fn=Collate(self.task))
        for batch, counts in scoring_batches(batches, backend.module, backend):
            nll, tokens = self.task.sequence_nll(backend.module, batch)
            if counts:
                rows.append(torch.stack([batch["question"].double().cpu(), batch["correct"].double().cpu(),
                                         (nll / tokens.clamp(min=1)).double().cpu()], 1))
        scores = gather_rows(torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64))
        best: dict[float, tuple[float, float]] = {}  # question -> (mean NLL, right) of its likeliest choice so far
        for question, right, nll in scores.tolist():
            if question not in best or nll < best[question][0]:
                best[question] = (nll, right)
        return {"accuracy": sum(right for _, right in best.values()) / max(len(best), 1)}, None

    def retained(self) -> tuple[str, ...]:
        return ("accuracy",)


KINDS = {"task": TaskReference, "drift": DriftReference, "choice": ChoiceReference}  # the kinds that fit nothing


def retention_ratio(before: float, after: float) -> float:
    """after / before for higher-is-better metrics: 1.0 means nothing was lost."""
    return after / before if before > 0 else float(after >= before)


class References:
    """Every reference of a run: scores before training, re-scores, retention ratios."""

    def __init__(self, references: list[Reference]):
        self.references = references

    def __bool__(self) -> bool:
        return bool(self.references)

    def named(self, name: str | None) -> Reference:
        return next((r for r in self.references if r.name == name), self.references[0]) if name else self.references[0]

    def score_base(self, backend) -> None:
        for reference in self.references:
            reference.before, reference.original_probe = reference.score(backend)
            if isinstance(reference, TaskReference):
                reference.answers_before = reference.answers

    def evaluate(self, backend) -> dict[str, float]:
        """``ref/<name>/<metric>`` now, ``ref_before/...``, ``retention/<name>/<metric>``,
        ``retention/min`` (the worst over every reference and metric) and the time it took."""
        started = time.perf_counter()
        record: dict[str, float] = {}
        for reference in self.references:
            scores, _ = reference.score(backend)
            for metric, value in scores.items():
                record[f"ref/{reference.name}/{metric}"] = value
                if metric in reference.retained():
                    record[f"retention/{reference.name}/{metric}"] = retention_ratio(reference.before[metric], value)
        if record:
            record["retention/min"] = min(v for k, v in record.items() if k.startswith("retention/"))
        record["ref/time_s"] = time.perf_counter() - started
        return record

    def generations(self, backend) -> dict[str, list[dict[str, str]]]:
        """Rank 0's first prompts of each reference that generates, with the answers before
        training and now (after the last ``evaluate``); a drift reference answers them again."""
        found = {}
        for reference in self.references:
            if isinstance(reference, DriftReference):
                found[reference.name] = joined_samples(reference.answers, reference.answer(backend)[1])
            elif isinstance(reference, TaskReference) and reference.answers_before:
                found[reference.name] = joined_samples(reference.answers_before, reference.answers)
        return found

    def before(self) -> dict[str, float]:
        return {f"ref/{r.name}/{metric}": value for r in self.references for metric, value in r.before.items()}


def chosen_on_validation(record: dict[str, float]) -> dict[str, float]:
    """A record scored on the references' validation rows, named apart from the test rows' own:
    ``ref_val/<name>/<metric>``, ``retention_val/<name>/<metric>``, ``retention_val/min``."""
    def renamed(key: str) -> str:
        kind, _, rest = key.partition("/")
        return f"{kind}_val/{rest}" if kind in ("ref", "retention") else key

    return {renamed(key): value for key, value in record.items()}


def reference_split(name: str, split: str) -> str:
    """The Ray Train dataset name of a reference split."""
    return f"ref_{name}_{split}"


@dataclass
class PlannedReference:
    """A reference as the driver checked it: what the workers need (name, kind, labels, split
    names) and, on the driver only, its data section, task and splits."""

    name: str
    kind: str
    labels: list[str] | None
    split_names: list[str]
    data: Any = None
    task: Any = None
    splits: dict[str, tabular.Split] | None = None

    def for_workers(self) -> "PlannedReference":
        return PlannedReference(self.name, self.kind, self.labels, self.split_names)


def original_head_labels(recipe: Recipe, given: list[str] | None, prefix: str) -> list[str]:
    """The labels of the base model's own classifier head, which a ``head`` reference reads."""
    task = build_task(recipe, recipe.data.labels or [])
    if not hasattr(task, "original_head"):
        raise UserError(f"{prefix}.kind", f"head: the {recipe.task.type} task keeps no original classifier head to read; use kind probe")
    labels = task.original_head()[0]
    if given is not None and list(given) != labels:
        raise UserError(f"{prefix}.data.labels", f"a head reference reads the base model's labels {labels}; remove data.labels or list exactly those")
    return labels


@register
class RetentionReferences(AddOn):
    """Scores every reference before training, at every evaluation and at the end; the run's
    retention (after / before) and its worst point come from here."""

    section = "retention"

    @classmethod
    def plan(cls, recipe: Recipe, task, splits) -> list[PlannedReference]:
        """Check every reference's data (driver side): its splits and label set. With a
        ``retention.floor``, every reference also gets a validation split the floor chooses on,
        apart from the test split it reports on (``chosen_on_validation``)."""
        planned = []
        floor = recipe.retention.floor is not None
        for i, reference in enumerate(recipe.retention.references):
            data = reference.data
            if reference.kind == "head":  # rows are labelled in the base model's own labels, in its order
                data = data.model_copy(update={"labels": original_head_labels(recipe, data.labels, f"retention.references.{i}")})
            splits, labels = tabular.plan_splits(data, prefix=f"retention.references.{i}.data")
            by_name = {split.name: split for split in splits}
            if floor and by_name["validation"].expected_rows(data) == 0:
                where = "validation" if data.validation else "validation_fraction"
                raise UserError(f"retention.references.{i}.data.{where}", "leaves no rows for retention.floor to choose on; "
                                "raise data.validation_fraction or give a data.validation file")
            if reference.kind in ("task", "drift", "choice"):  # the whole set scored, nothing fitted
                train = by_name["train"]
                # Without a floor every row of data.train is scored; with one, the rows held out of it
                # (or data.validation) are chosen on and the rest (or data.test) reported on.
                whole = tabular.Split("train", train.path, train.fmt, "all", train.field, train.rows)
                test = by_name.get("test") or (train if floor else whole)
                labels = recipe.data.labels  # the run's label set: its model scores these rows
                # Replay reads a task reference's train rows (the schema made sure they are not the test rows;
                # with a floor, not the validation rows either).
                replayed = recipe.replay is not None and (recipe.replay.reference or recipe.retention.references[0].name) == reference.name
                splits = {"test": test, **({"validation": by_name["validation"]} if floor else {}),
                          **({"train": train if floor else tabular.Split("train", train.path, train.fmt)} if replayed else {})}
                planned.append(PlannedReference(reference.name, reference.kind, labels, list(splits), data,
                                                build_task(recipe, labels or []), splits))
                continue
            if labels is None:
                raise UserError(f"retention.references.{i}.data.columns", "a probe reference needs a label column")
            if floor and "test" not in by_name:
                raise UserError(f"retention.references.{i}.data.test", "retention.floor chooses on this reference's validation "
                                "rows (held out of data.train, or data.validation) and reports on its test rows: give a test file")
            # The held-out part of train is the probe's test split when no test file is given.
            test = by_name.get("test") or by_name["validation"]
            chosen = {"validation": by_name["validation"]} if floor else {}
            planned.append(PlannedReference(reference.name, reference.kind, labels, ["test", "train", *chosen], data,
                                            build_task(recipe, labels), {"train": by_name["train"], "test": test, **chosen}))
        return planned

    @classmethod
    def datasets(cls, planned: list[PlannedReference], workers: int) -> dict[str, Any]:
        datasets = {}
        for reference in planned:
            for split_name, split in reference.splits.items():
                datasets[reference_split(reference.name, split_name)] = tabular.prepare_split(
                    split, reference.data, reference.labels, [reference.task.preprocess], cache=True, blocks=2 * workers, equal=False)[0]  # scored again and again
        return datasets

    @classmethod
    def summary(cls, recipe: Recipe, state: dict[str, Any]) -> dict[str, Any] | None:
        """Reference scores before and after, the ratios, the worst seen during the run, the cost."""
        if "ref_final" not in state:
            return None
        final = state["ref_final"]
        summary = {
            "before": state["ref_before"],
            "after": {k: v for k, v in final.items() if k.startswith("ref/") and k != "ref/time_s"},
            "retention": {k: v for k, v in final.items() if k.startswith("retention/")},
            "worst_during_run": state.get("worst_retention"),
            "reference_eval_time_s": state.get("ref_time_s", 0.0),
        }
        if "ref_val_final" in state:  # retention.floor: the same on the references' validation rows
            chosen = state["ref_val_final"]
            summary["validation"] = {"before": state["ref_val_before"],
                                     "after": {k: v for k, v in chosen.items() if k.startswith("ref_val/") and k != "ref_val/time_s"},
                                     "retention": {k: v for k, v in chosen.items() if k.startswith("retention_val/")}}
        return summary

    def __init__(self, loop):
        super().__init__(loop)
        references, chosen_on = [], []
        for spec in loop.plan.addons["retention"]:
            shards = {split: loop.shards[reference_split(spec.name, split)] for split in spec.split_names}
            references.append(self.build(spec, shards))
            if "validation" in shards:  # the same reference scored on its validation rows (retention.floor)
                chosen_on.append(self.build(spec, {**shards, "test": shards["validation"]}))
        self.references = References(references)
        self.references.score_base(loop.backend)
        # The validation rows are scored before training and at the end (and by WiSE-FT), not every epoch.
        self.validation = References(chosen_on) if chosen_on else None
        if self.validation:
            self.validation.score_base(loop.backend)
        if loop.rank == 0:
            logger.info("reference before training: %s", ", ".join(f"{k} {v:.4f}" for k, v in self.references.before().items()))

    def build(self, spec: PlannedReference, shards: dict[str, Any]):
        """One reference object, scoring ``shards["test"]``."""
        loop = self.loop
        if spec.kind in KINDS:
            return KINDS[spec.kind](spec.name, loop.task, shards if spec.kind == "task" else shards["test"], loop.eval_batch)
        reference_task = build_task(loop.recipe, spec.labels)
        head = Probe.from_head(*reference_task.original_head()[1:]) if spec.kind == "head" else None
        return Reference(spec.name, reference_task, len(spec.labels), shards, loop.eval_batch, head)

    def evaluate(self, backend) -> dict[str, float]:
        """The references' record on their test rows and, with a floor, on their validation rows
        (``ref_val/...``, ``retention_val/...``), without the time it took."""
        record = {k: v for k, v in self.references.evaluate(backend).items() if k != "ref/time_s"}
        if self.validation:
            record.update(chosen_on_validation({k: v for k, v in self.validation.evaluate(backend).items() if k != "ref/time_s"}))
        return record

    def end_epoch(self, record, state):
        reference = self.references.evaluate(self.loop.backend)
        record.update(reference)
        if "retention/min" in reference:
            state["worst_retention"] = min(state.get("worst_retention", 1.0), reference["retention/min"])
            state["ref_time_s"] = state.get("ref_time_s", 0.0) + reference["ref/time_s"]

    def final(self, state):
        state["ref_before"] = self.references.before()
        state["ref_final"] = self.references.evaluate(self.loop.backend)
        state["generations"] = self.references.generations(self.loop.backend)
        if self.validation:
            state["ref_val_before"] = chosen_on_validation(self.validation.before())
            state["ref_val_final"] = chosen_on_validation(self.validation.evaluate(self.loop.backend))
