"""The recipe's schema: typed sections, each field with its bounds and a description.

A recipe is data. Validated here, unknown keys are errors and every error names its dotted path,
the bad value and what is allowed. This module knows no registry: a task's options and a
strategy's options are models the task or strategy owns (subclasses of ``TaskOptions`` and
``StrategyOptions``); ``raytune_ft.recipe`` checks a recipe against the registries and puts the
owner's typed options in place, so every reader, on the driver or on a worker, reads attributes.
"""

from __future__ import annotations

import copy
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError, field_validator, model_validator

from raytune_ft.errors import RecipeError, UserError


# Integers reach numpy, torch and Ray, which hold 64 bits; seeds reach numpy's RandomState, which holds 32.
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1


def number_problem(value: Any, where: str = "") -> str | None:
    """What breaks the rule every number in a recipe keeps, typed or not (a raw DeepSpeed config,
    a searched choice): finite, and an integer within 64 bits. None when ``value`` keeps it."""
    at = f" at {where}" if where else ""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{at}" + (f" (got {value})" if where else "")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return f"must fit in 64 bits (at most {INT64_MAX}){at}" + (f" (got {value})" if where else "")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        problem = number_problem(item, f"{where}.{key}" if where else str(key))
        if problem:
            return problem
    return None


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment,
    text is never empty and every number is finite and fits 64 bits (``number_problem``)."""

    # allow_inf_nan: a typed float refuses inf and NaN before its bounds are compared (NaN passes none).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, str_min_length=1, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _numbers_in_bounds(cls, value: Any) -> Any:
        problem = number_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class TaskOptions(Section):
    """``task.type`` picks a registered task; the task's own ``Options`` (a subclass) holds the rest
    of the section. Until the recipe is checked against the registry, the other keys wait here."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="registered task name, e.g. text_classification")


class ModelSection(Section):
    path: str = Field(description="a model directory, 'asset:NAME' (offline assets) or a hub id")
    num_layers: Optional[int] = Field(
        None, ge=1, description="keep only the first N transformer layers of the pretrained encoder, with their "
                                "pretrained weights (a smaller student for distill:); text tasks")
    dtype: Optional[Literal["fp32", "bf16", "fp16"]] = Field(
        None, description="the weights' dtype as loaded and trained; default: the checkpoint's own (config.json's dtype). "
                          "Transformers models load straight into it; under ZeRO-3 each worker loads only its partition")


class DataSection(Section):
    train: str = Field(description="parquet/jsonl/csv/tsv file or folder, an image folder (one subfolder per class), or 'asset:NAME'")
    validation: Optional[str] = None
    test: Optional[str] = None
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="held out of train (by a stable hash) when no validation set"
    )
    format: Literal["auto", "parquet", "jsonl", "csv", "tsv", "images"] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict, description="task role -> column name, e.g. {text: review, label: rating}"
    )
    labels: Optional[list[str] | dict[str, list[str]]] = Field(
        None, description="the label set; default: sorted labels of train. A task with several label roles "
                          "(multitask heads): {role: [labels]}, each role's default likewise")
    other_label: dict[str, str] = Field(
        default_factory=dict, description="label role -> bucket label: values outside that role's label set become "
                                          "this label (added to the set) instead of an error, e.g. {condition: other}")
    max_rows: Optional[int] = Field(None, ge=1, description="use at most this many rows of each split")
    shuffle_buffer: int = Field(10_000, ge=0, description="rows in each worker's shuffle buffer")
    cache: Literal["auto", "always", "never"] = Field(
        "auto", description="keep preprocessed splits in Ray's object store across epochs; auto: local data under 256 MB"
    )
    on_bad_rows: Literal["fail", "skip"] = Field(
        "fail", description="a bad row (a null, empty or non-text cell where a value or text is read; an undecodable image "
                            "or clip): fail naming its file, column and row, or skip and count it"
    )
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="skip: refuse a split with a larger fraction of bad rows")

    @model_validator(mode="after")
    def _labels_unique(self):
        label_sets = self.labels if isinstance(self.labels, dict) else {"": self.labels} if self.labels is not None else {}
        for role, labels in label_sets.items():
            field = f"data.labels.{role}" if role else "data.labels"
            if len(set(labels)) != len(labels):
                raise ValueError(f"{field}: labels must be unique")
            if len(labels) + (role in self.other_label and self.other_label[role] not in labels) < 2:
                raise ValueError(f"{field}: need at least 2 labels")
        return self


class StrategyOptions(Section):
    """What is trained: ``method`` picks a registered strategy, whose own ``Options`` (a subclass)
    adds that strategy's fields. Until the recipe is checked against the registry, other keys wait here."""

    model_config = ConfigDict(extra="allow")
    method: str = Field("full", description="what is trained: a registered strategy name")
    layer_lr_decay: Optional[float] = Field(None, gt=0, le=1, description="lr x decay^(depth from the top) per layer (every strategy)")


class ReferenceSection(Section):
    """One reference evaluation of the original capability (scored before training and at every
    evaluation). ``probe``: a linear probe on the frozen pooled embeddings of a labelled set.
    ``head``: the base model's own classifier head, as pretrained, on the current features of a
    set labelled in the base model's labels (accuracy on the original classes with the original
    head; nothing fitted). ``task``: the task's own metrics on a reference set with the task's
    columns (e.g. WER on real speech), evaluated as is; data.test if given, else every row of
    data.train. Language models (causal_lm): ``drift``: prompts the base model answers greedily
    before training, its answers then scored by their likelihood under the current model;
    ``choice``: questions with choices, the choice the model finds likeliest as the answer."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$", description="metrics are named ref/<name>/<metric>")
    kind: Literal["probe", "head", "task", "drift", "choice"] = "probe"
    data: DataSection = Field(description="the reference set (same fields as data:); probe: labelled")


class FloorBudget(Section):
    """What ``retention.floor`` may spend beyond the first fine-tuning (its WiSE-FT sweep costs no
    training): Tune trials over mitigations and their strengths, and a wall-clock limit."""

    trials: int = Field(4, ge=0, le=1000, description="Tune trials of the search over mitigations (LoRA rank, frozen depth, "
                                                      "L2-SP/EWC strength, replay fraction); 0: WiSE-FT only")
    time_s: Optional[float] = Field(None, gt=0, description="wall-clock seconds for the whole floor, the first fine-tuning "
                                                            "included; the search gets what is left and stops when it runs out")
    max_concurrent_trials: int = Field(1, ge=1, description="search trials at once, each with scaling.workers workers")


class RetentionSection(Section):
    references: list[ReferenceSection] = Field(min_length=1)
    floor: Optional[float] = Field(
        None, gt=0, le=1.5, description="deliver the fine-tuned model with the most gain whose retention (the minimum over the "
                                        "references, after / before) is at least this, chosen on validation splits: WiSE-FT of "
                                        "one fine-tuning first, then a Tune search within retention.budget (docs/retention.md)")
    target_metric: Optional[str] = Field(
        None, pattern=r"^eval/[A-Za-z0-9_]+$", description="floor: the target metric the gain is measured on (higher is better); "
                                                           "default wise_ft.metric, else the first of accuracy, word_accuracy, "
                                                           "inverse_perplexity the task reports")
    budget: FloorBudget = Field(default_factory=FloorBudget, description="floor: what reaching it may spend")
    margin: float = Field(0.0, ge=0, le=0.5, description="floor: a guard band; settings are chosen at validation retention >= "
                                                         "floor + margin, since the best-scoring one at the floor is the likeliest to "
                                                         "fall below it on test (a few hundred reference rows: ~0.02)")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [reference.name for reference in self.references]
        if len(set(names)) != len(names):
            raise ValueError("retention.references: names must be unique")
        if self.floor is None:  # compared with the defaults: a recipe written back (recipe.yaml) states them
            for name, default in (("target_metric", None), ("budget", FloorBudget()), ("margin", 0.0)):
                if getattr(self, name) != default:
                    raise ValueError(f"retention.{name}: only with retention.floor (set a floor, e.g. 0.98)")
        return self


class RegularizerSection(Section):
    """Penalise moving away from the pretrained weights: ``l2sp`` (plain distance) or ``ewc``
    (distance weighted by a diagonal Fisher of the reference task, normalised to mean 1)."""

    method: Literal["l2sp", "ewc"]
    strength: float = Field(gt=0, description="lambda of (lambda/2) * sum w * (theta - theta_0)^2, taken as a proximal step "
                            "before each optimizer step: about lr x lambda x w of the distance back per step")
    reference: Optional[str] = Field(None, description="ewc: the retention reference for the Fisher; default the first")
    fisher_samples: int = Field(256, ge=8, description="ewc: reference rows for the Fisher estimate")


class ReplaySection(Section):
    """Mix reference rows into every training batch: a probe or head reference's rows with the
    original readout's loss, a task reference's train rows with the task's own loss (a language
    model's general text in its language-modelling loss)."""

    reference: Optional[str] = Field(None, description="a retention reference name; default the first")
    fraction: float = Field(0.1, gt=0, lt=1, description="share of each batch that is replayed reference data")
    loss_weight: float = Field(1.0, gt=0)


class WiseFTSection(Section):
    """After training, interpolate theta(a) = (1-a) theta_base + a theta_tuned and export the best a."""

    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    metric: str = Field("eval/accuracy", pattern=r"^eval/[A-Za-z0-9_]+$", description="target metric (higher is better)")
    min_retention: float = Field(0.98, ge=0, le=1.5, description="pick the best target score among alphas with retention >= this (0: no limit)")

    @model_validator(mode="after")
    def _alphas_in_range(self):
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"wise_ft.alphas: every alpha must be in [0, 1] (got {self.alphas})")
        return self


class DistillSection(Section):
    """Train the model as a student of a fine-tuned teacher (Hinton et al. 2015):
    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)."""

    teacher: str = Field(description="a finished run of the same task and labels (its output.dir), or its model/ directory")
    temperature: float = Field(2.0, gt=0, description="T: above 1 softens both distributions, so the teacher's ranking of wrong classes shows")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft-target KL term; 1 - alpha weighs the hard-label loss")


class EarlyStoppingSection(Section):
    metric: str = Field("eval/loss", pattern=r"^eval/[A-Za-z0-9_]+$")
    mode: Literal["min", "max"] = "min"
    patience: int = Field(2, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)


class TrainSection(Section):
    backend: str = Field("ddp", description="a registered backend: ddp | deepspeed (options in the deepspeed section)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(5e-5, ge=0, le=10, description="peak learning rate; 0 trains nothing (a measurement run)")
    head_lr_scale: float = Field(1.0, gt=0, le=1000, description="the task head's lr as a multiple of lr: a new head learning "
                                 "from scratch beside a body that should move little (a penalty, replay, few steps)")
    weight_decay: float = Field(0.01, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    warmup: float = Field(0.0, ge=0, description="a fraction of all steps (< 1) or a step count (>= 1)")
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    epochs: Optional[int] = Field(3, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="optimizer steps; ends training early")
    batch_size: int = Field(16, ge=1, description="per worker")
    eval_batch_size: Optional[int] = Field(None, ge=1, description="per worker; default 2 x batch_size")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    clip_grad_norm: Optional[float] = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16: autocast (ddp) or bf16 weights (deepspeed); fp16: autocast with loss scaling (ddp), "
                            "or fp16 weights with loss scaling (deepspeed, on GPU)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass instead of keeping them: far less "
                           "activation memory for ~30% more compute (models built on transformers)")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="seeds Python, numpy and torch on every worker")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="overrides the model's dropout")
    early_stopping: Optional[EarlyStoppingSection] = None
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint")
    log_every: int = Field(10, ge=1, description="optimizer steps between progress lines")

    @model_validator(mode="after")
    def _length(self):
        if self.epochs is None and self.max_steps is None:
            raise ValueError("train.epochs: give epochs or max_steps")
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise ValueError("train.warmup: a step count must be a whole number (or a fraction < 1)")
        return self


class ScalingSection(Section):
    """What the run asks Ray for; checked against the cluster (this machine, for the embedded Ray)
    before any work is submitted."""

    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"CPU": 1}, description="Ray resources each worker reserves, e.g. {CPU: 4, GPU: 1}; "
                                                        "names a node of the cluster offers")
    max_wait_s: float = Field(900, gt=0, description="an autoscaling cluster: seconds to wait for the nodes the run needs "
                                                     "before giving up")


class DeepSpeedSection(Section):
    """Options of ``train.backend: deepspeed``. Batch size, accumulation, clipping and precision come
    from ``train``, so both backends mean the same thing by the same field."""

    zero_stage: int = Field(
        2, ge=0, le=3, description="0: replicas (like ddp); 1: shard optimizer state; 2: and gradients; 3: and parameters"
    )
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="optimizer state and step in CPU memory (zero_stage >= 1)")
    offload_params: Literal["none", "cpu"] = Field("none", description="parameters in CPU memory between uses (zero_stage 3)")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="raw DeepSpeed config merged over the generated one; keys the recipe sets must agree with it",
    )

    @model_validator(mode="after")
    def _offload_needs_stage(self):
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            raise ValueError(f"deepspeed.offload_optimizer: offloading the optimizer needs zero_stage 1, 2 or 3 (got {self.zero_stage})")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_params: offloading parameters needs zero_stage 3 (got {self.zero_stage})")
        return self


class BaselineSection(Section):
    """The reference point for 'gain': the base model with only a new head trained (body frozen)."""

    enabled: bool = True
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0, le=10, description="the head's learning rate (train.lr of the baseline's run)")


TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql")


class MlflowSection(Section):
    """Log the run to MLflow: the recipe as params (dotted keys), every report's metrics (step: the
    optimizer step) as the epochs finish, and at the end the exported model, summary and report."""

    tracking_uri: Optional[str] = Field(
        None, description="file:PATH or a plain path (a local file store), sqlite:///PATH, http(s)://HOST (a tracking "
                          "server), databricks, ...; default: the file store file:<run dir>/mlruns",
    )
    experiment: Optional[str] = Field(None, min_length=1, description="MLflow experiment; default: the recipe name")
    run_name: Optional[str] = Field(None, min_length=1, description="default: the recipe name")

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, value: Optional[str]) -> Optional[str]:
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", value or "")
        if value is not None and scheme and len(scheme[1]) > 1 and scheme[1].split("+")[0].lower() not in TRACKING_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme[1]!r}; give a path or file:PATH (a local store), sqlite:///PATH, "
                             f"http(s)://HOST (a tracking server), or one of {', '.join(TRACKING_SCHEMES)}")
        return value

    def resolved_uri(self, run_dir: Path) -> str:
        """The tracking URI with a local store as an absolute ``file:`` URI (default ``<run dir>/mlruns``)."""
        uri = self.tracking_uri or str(run_dir / "mlruns")
        if uri.startswith("file:") or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri):
            path = uri.removeprefix("file://").removeprefix("file:")
            return "file:" + str(Path(path).expanduser().resolve())
        return uri


class OutputSection(Section):
    dir: Optional[str] = Field(None, description="run directory; default runs/<name>")
    storage_path: Optional[str] = Field(
        None,
        description="shared storage every node reaches (s3://, gs:// or an absolute path on a shared "
                    "filesystem): checkpoints and, at the end, the outputs land in storage_path/<run dir name>; "
                    "default: the run directory itself",
    )
    checkpoints_to_keep: int = Field(2, ge=1)
    tensorboard: bool = Field(False, description="TensorBoard event files in <run dir>/tensorboard (a Tune trial: <experiment>/tensorboard/<trial>)")
    mlflow: Optional[MlflowSection] = Field(None, description="log to MLflow ({} or true: a file store in <run dir>/mlruns)")

    @field_validator("mlflow", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        # ``mlflow: true`` switches it on with the defaults; ``false`` leaves it off.
        return {} if value is True else None if value is False else value

    @field_validator("storage_path")
    @classmethod
    def _shared(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^([a-z][a-z0-9+.-]*://|/|~)", value):
            raise ValueError("give s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or an absolute path on a filesystem every node mounts")
        return value

    def storage_root(self, run_dir: Path) -> str:
        """Where Ray Train keeps the run (``storage_root/<run dir name>``)."""
        if self.storage_path is None:
            return str(run_dir.parent)
        if "://" in self.storage_path:
            path, mark, query = self.storage_path.partition("?")
            return f"{path.rstrip('/')}{mark}{query}"
        return str(Path(self.storage_path).expanduser().resolve())


class Dimension(Section):
    """One searched recipe field: exactly one distribution. ``randint`` bounds are inclusive."""

    loguniform: Optional[list[float]] = Field(None, min_length=2, max_length=2, description="[low, high], low > 0")
    uniform: Optional[list[float]] = Field(None, min_length=2, max_length=2, description="[low, high]")
    randint: Optional[list[int]] = Field(None, min_length=2, max_length=2, description="[low, high], both included")
    choice: Optional[list[Any]] = Field(None, description="values sampled uniformly")
    grid: Optional[list[Any]] = Field(None, description="every value, one trial each (times num_samples)")

    @field_validator("choice", "grid")
    @classmethod
    def _yaml_floats(cls, values):
        # YAML 1.1 reads 1e-5 as a string; take the float people mean, as --set does.
        return [parse_value(value) if isinstance(value, str) else value for value in values] if values else values

    @model_validator(mode="after")
    def _one_distribution(self):
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        kind, values = self.kind, self.values
        if kind in ("choice", "grid") and not values:
            raise ValueError(f"empty {kind}: give at least one value")
        if kind in ("loguniform", "uniform", "randint") and values[0] > values[1]:
            raise ValueError(f"{kind} low {values[0]} is above high {values[1]}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform low must be > 0 (got {values[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def values(self) -> list[Any]:
        return getattr(self, self.kind)

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is one this dimension can take."""
        if self.kind in ("choice", "grid"):
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind == "randint" and not isinstance(value, int)):
            return False
        return self.values[0] <= value <= self.values[1]


DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
METRIC_PATTERN = r"^(eval|train|ref|retention)/[A-Za-z0-9_/]+$"


class AshaSection(Section):
    """Asynchronous successive halving: at epochs grace_period x reduction_factor^k, only the top
    1/reduction_factor of the trials that got there go on."""

    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="keep the best 1/reduction_factor at each milestone")


class PbtSection(Section):
    """Population based training: every ``interval`` epochs, a trial in the bottom ``quantile`` copies
    the weights of one in the top quantile and perturbs its hyperparameters (x0.8 / x1.2, or the
    neighbouring choice; resampled from the space with probability ``resample_probability``)."""

    interval: int = Field(1, ge=1, description="epochs between exploit/explore steps")
    quantile: float = Field(0.25, gt=0, le=0.5, description="fraction of trials in the top and bottom groups")
    resample_probability: float = Field(0.25, ge=0, le=1)
    synchronous: bool = Field(False, description="every trial waits at each interval for the others (reproducible, "
                                                 "slower) instead of being perturbed as it arrives")


# What a PBT trial can change when it continues another trial's run: read afresh at every restart,
# none of them shapes the data, the step plan or the parameter set.
PBT_MUTABLE = ("train.lr", "train.weight_decay", "train.clip_grad_norm", "train.dropout",
               "regularizer.strength", "replay.loss_weight")


class TuneSection(Section):
    """``raytune-ft tune``: trials of this recipe with the ``space`` fields sampled (dotted paths)."""

    space: dict[str, Dimension] = Field(min_length=1, description="dotted recipe path -> distribution")
    num_samples: int = Field(8, ge=1, description="random / optuna: trials; grid: repeats of the whole grid")
    max_concurrent_trials: int = Field(2, ge=1, description="trials running at once, each with its own worker group")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers of each trial (replaces scaling.workers)")
    metric: str | list[str] = Field("eval/accuracy", description="the metric, or two for a Pareto front")
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = Field("max", description="per metric")
    searcher: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["fifo", "asha", "pbt"] = Field("fifo", description="asha and pbt act on the first metric")
    asha: AshaSection = Field(default_factory=AshaSection)
    pbt: PbtSection = Field(default_factory=PbtSection)
    max_failures: int = Field(0, ge=0, description="retries of a crashed trial, from its last checkpoint")
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX, description="seeds the searcher, so the same trials are proposed again")
    time_budget_s: Optional[float] = Field(None, gt=0, description="stop the search after this many seconds (running trials end unfinished)")
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list, description="trials to run first, each a value "
                                                     "for every space path (random, optuna); then the searcher's, up to num_samples")

    @model_validator(mode="after")
    def _objectives(self):
        metrics, modes = self.metrics, self.modes
        if len(metrics) > 2 or len(set(metrics)) != len(metrics):
            raise ValueError(f"tune.metric: one metric, or two different ones for a Pareto front (got {metrics})")
        for metric in metrics:
            if not re.match(METRIC_PATTERN, metric):
                raise ValueError(f"tune.metric: {metric!r} is not a reported metric name like eval/accuracy or retention/min")
        if isinstance(self.mode, list) and len(modes) != len(metrics):
            raise ValueError(f"tune.mode: give one mode per metric ({len(metrics)}), got {len(modes)}")
        if self.scheduler == "pbt":
            fixed = [path for path in self.space if path not in PBT_MUTABLE]
            if fixed:
                raise ValueError(f"tune.space: pbt continues one trial's run with another's hyperparameters, so it can "
                                 f"only search {', '.join(PBT_MUTABLE)}; not {', '.join(fixed)}")
            if self.searcher == "optuna":
                raise ValueError("tune.searcher: pbt proposes its own configurations; use random or grid")
        for index, point in enumerate(self.points_to_evaluate):
            if set(point) != set(self.space):
                raise ValueError(f"tune.points_to_evaluate.{index}: give a value for every space path ({', '.join(self.space)}), "
                                 f"got {', '.join(point) or 'none'}")
            for path, value in point.items():
                if not self.space[path].admits(value):
                    raise ValueError(f"tune.points_to_evaluate.{index}.{path}: {value!r} is not in tune.space.{path}")
        if self.points_to_evaluate and self.searcher == "grid":
            raise ValueError("tune.points_to_evaluate: grid runs every grid point; use searcher random or optuna")
        if self.searcher == "grid":
            random = [path for path, dimension in self.space.items() if dimension.kind != "grid"]
            if random:
                raise ValueError(f"tune.searcher: grid searches grid dimensions only; {', '.join(random)} "
                                 "samples (use grid: [...], or searcher random)")
        if self.searcher == "optuna":
            grids = [path for path, dimension in self.space.items() if dimension.kind == "grid"]
            if grids:
                raise ValueError(f"tune.searcher: optuna samples every dimension; use choice instead of grid for {', '.join(grids)}")
        return self

    @property
    def metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    @property
    def modes(self) -> list[str]:
        return self.mode if isinstance(self.mode, list) else [self.mode] * len(self.metrics)


class QuantizeSection(Section):
    """Dynamic int8 quantisation of the Linear layers (PyTorch's own): size, CPU latency, accuracy."""

    latency_batches: int = Field(20, ge=1, description="test batches timed for CPU inference latency (median, one thread)")
    weights: Literal["per_tensor", "per_channel"] = Field("per_tensor", description="int8 weight scales: one per matrix (PyTorch's default) or one per output row")


class PruneSection(Section):
    """Magnitude pruning to a target sparsity, optionally followed by a short mask-keeping fine-tune."""

    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of the pruned weights set to zero")
    scope: Literal["global", "layer"] = Field("global", description="global: one threshold over all layers; layer: each layer to the sparsity")
    finetune_steps: int = Field(0, ge=0, description="optimizer steps of fine-tuning after pruning, the mask kept (0: none)")
    finetune_lr: Optional[float] = Field(None, gt=0, description="fine-tune learning rate, constant (default: the run's train.lr)")


class ExplainSection(Section):
    """Saliency for a few test examples: the ones given, else the run's most confident errors."""

    method: Literal["integrated_gradients", "gradient_x_input"] = "integrated_gradients"
    examples: int = Field(4, ge=1, le=64, description="how many examples to explain")
    rows: Optional[list[int]] = Field(None, description="test-split row numbers to explain (default: the most confident errors)")
    steps: int = Field(32, ge=1, le=4096, description="integrated gradients: interpolation points to start with")
    tolerance: float = Field(0.01, gt=0, description="integrated gradients: steps double (up to 16x) until the attributions "
                                                     "sum to F(x) - F(baseline) within this fraction")
    attention: bool = Field(True, description="transformers: also render the last layer's attention maps")


class PostSection(Section):
    """Post-training steps run on the finished run (also: ``raytune-ft post RUN_DIR``); each writes
    ``post/<step>.json`` and appears in the HTML report."""

    quantize: Optional[QuantizeSection] = None
    prune: Optional[PruneSection] = None
    explain: Optional[ExplainSection] = None
    report: bool = Field(True, description="write report.html at the end of the run")

    def options(self, step: str) -> Section:
        """The step's options as configured, or its defaults when the recipe leaves it out."""
        return getattr(self, step) or {"quantize": QuantizeSection, "prune": PruneSection, "explain": ExplainSection}[step]()


class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: SerializeAsAny[TaskOptions]
    model: ModelSection
    data: DataSection
    strategy: SerializeAsAny[StrategyOptions] = Field(default_factory=StrategyOptions)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    baseline: BaselineSection = Field(default_factory=BaselineSection)
    retention: Optional[RetentionSection] = None
    regularizer: Optional[RegularizerSection] = None
    replay: Optional[ReplaySection] = None
    wise_ft: Optional[WiseFTSection] = None
    distill: Optional[DistillSection] = None
    post: PostSection = Field(default_factory=PostSection)
    output: OutputSection = Field(default_factory=OutputSection)
    tune: Optional[TuneSection] = Field(None, description="raytune-ft tune: the search space and how to search it")
    _file: Optional[Path] = PrivateAttr(None)  # set by raytune_ft.recipe.load_recipe

    @property
    def file(self) -> Optional[Path]:
        """The YAML file this recipe was loaded from, if it was."""
        return self._file

    @model_validator(mode="after")
    def _retention_links(self):
        names = [r.name for r in self.retention.references] if self.retention else []
        for section, field in (("regularizer", "reference"), ("replay", "reference")):
            value = getattr(self, section)
            if value is None or (section == "regularizer" and value.method != "ewc"):
                continue
            if not names:
                raise ValueError(f"{section}: needs a retention reference (add retention.references)")
            if getattr(value, field) is not None and getattr(value, field) not in names:
                raise ValueError(f"{section}.{field}: unknown reference {getattr(value, field)!r}; defined: {', '.join(names)}")
            chosen = next(r for r in self.retention.references if r.name == (getattr(value, field) or names[0]))
            if chosen.kind in ("drift", "choice") or (chosen.kind == "task" and section == "regularizer"):
                needs = "a probe or head reference (its original readout)" if section == "regularizer" else "a probe, head or task reference"
                raise ValueError(f"{section}.{field}: reference {chosen.name!r} is kind {chosen.kind}; {section} needs {needs}")
            if chosen.kind == "task" and not chosen.data.test:
                raise ValueError(f"{section}.{field}: task reference {chosen.name!r} scores every row of its data.train; give it a "
                                 "data.test to score, so that the rows replayed (its data.train) are not the rows scored")
        return self

    def run_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}").expanduser().resolve()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def problems_of(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """A pydantic error as (dotted field, message) pairs, the way every recipe error reads."""
    problems = []
    for item in error.errors():
        path = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif "input" in item and not isinstance(item["input"], (dict, list)):
            message += f" (got {item['input']!r})"
        head, sep, rest = message.partition(": ")
        if sep and " " not in head and head.startswith(path):  # a validator named a deeper field
            path, message = head, rest
        problems.append((path, message))
    return problems


def parse_value(text: str) -> Any:
    """A ``--set`` value is YAML: ``3e-5`` is a float, ``[a, b]`` a list, ``null`` None; text
    YAML cannot read stays text (validation then says what the field takes)."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, ValueError):
        return text
    # YAML 1.1 reads '3e-5' as a string; accept the float people mean.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            return value
    return value


def set_field(data: dict[str, Any], path: str, value: Any, source: str = "--set") -> None:
    """Set the dotted ``path`` of a raw recipe dict in place, creating missing sections.
    A number indexes a list: ``retention.references.0.data.max_rows``."""
    keys = path.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(source, [(".".join(keys[: i + 1]), f"no item {key} in a list of {len(node)}")])
            node = node[int(key)]
            continue
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise RecipeError(source, [(".".join(keys[: i + 1]), "is not a section")])
        node = child
    if isinstance(node, list):
        raise RecipeError(source, [(path, "set a field of a list item, e.g. retention.references.0.name")])
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw recipe dict (validated afterwards like the file)."""
    data = copy.deepcopy(data)
    for override in overrides:
        if "=" not in override:
            raise RecipeError("--set", [(override, "expected FIELD=VALUE, e.g. train.lr=3e-5")])
        path, text = override.split("=", 1)
        set_field(data, path.strip(), parse_value(text))
    return data


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except ValueError as error:  # a number YAML reads but Python will not hold (an int of 5000 digits)
        raise UserError(str(path), f"cannot read: {str(error).splitlines()[0][:200]}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(str(path), f"YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(str(path), "a recipe must be a YAML mapping with sections task, model, data, ...")
    return data



def join_uri(base: str, name: str) -> str:
    """``base/name`` for a path or a storage URI, its query string (an S3 endpoint, say) kept last."""
    path, mark, query = base.partition("?")
    return f"{path.rstrip('/')}/{name}{mark}{query}"


def dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe (or any nested config) as {dotted field: value}, a list of sections by
    index as ``--set`` writes it (``retention.references.0.name``)."""
    leaves: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves.update(dotted(value, f"{path}."))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for i, item in enumerate(value):
                leaves.update(dotted(item, f"{path}.{i}."))
        else:
            leaves[path] = value
    return leaves


def leaf_types(annotation: Any) -> set[Any]:
    """The types a field accepts, Optional and unions unwrapped (None dropped)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(leaf_types(arg) for arg in typing.get_args(annotation) if arg is not type(None)))
    if typing.get_origin(annotation) is typing.Annotated:  # SerializeAsAny[...] and the like
        return leaf_types(typing.get_args(annotation)[0])
    return {annotation}


def field_annotation(recipe: "Recipe", path: str) -> Any:
    """The annotation of a dotted path of ``recipe``; a section read as the model the recipe holds
    there (a strategy's own options, say). Raises KeyError naming the first unknown part."""
    node: Any = recipe
    annotation: Any = type(recipe)
    for i, key in enumerate(path.split(".")):
        models = [node.__class__] if isinstance(node, BaseModel) else \
            [t for t in leaf_types(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        containers = [t for t in leaf_types(annotation) if typing.get_origin(t) in (list, dict)]
        if models and key in models[0].model_fields:
            annotation = models[0].model_fields[key].annotation
            node = getattr(node, key, None) if isinstance(node, BaseModel) else None
        elif containers and (typing.get_origin(containers[0]) is dict or key.isdigit()):
            annotation, node = typing.get_args(containers[0])[-1], None
        else:
            raise KeyError(".".join(path.split(".")[: i + 1]))
    return annotation
