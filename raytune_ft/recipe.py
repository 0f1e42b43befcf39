"""Loading a recipe: the schema's validation, then the checks against the registries.

``load_recipe`` reads the YAML, applies ``--set`` overrides and validates. Validation is the
schema's (``raytune_ft.schema``) and then what only the registries know: the task and its options,
the data roles the task needs, the strategy and its options, the backend's own checks and the
``tune:`` space (every searched value must give a valid recipe). The task's and the strategy's
typed options replace the raw sections, so the recipe that leaves here is typed all the way down.
Every problem is collected and shown at once, each with its dotted path.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from raytune_ft.backends import BACKENDS
from raytune_ft.data.assets import PREFIX as ASSET_PREFIX
from raytune_ft.errors import RecipeError
from raytune_ft.schema import Recipe, apply_overrides, field_annotation, leaf_types, problems_of, read_recipe_file, set_field
from raytune_ft.strategies import STRATEGIES
from raytune_ft.tasks import TASKS, task_label_roles, task_metrics, task_reference_roles, task_roles

# Only these sections can be searched: data, model and task are prepared once on the driver and
# shared by every trial, and scaling is set by tune.workers_per_trial.
SEARCHABLE = ("strategy", "train", "regularizer", "replay", "wise_ft")


# A task's headline metric, higher is better: what retention.floor maximises unless told otherwise.
FLOOR_METRICS = ("accuracy", "word_accuracy", "inverse_perplexity")


def floor_metric(recipe: Recipe) -> str:
    """The target metric ``retention.floor`` measures gain on: ``retention.target_metric``, else
    ``wise_ft.metric``, else the first of ``FLOOR_METRICS`` the task reports."""
    if recipe.retention.target_metric:
        return recipe.retention.target_metric
    if recipe.wise_ft:
        return recipe.wise_ft.metric
    reported = task_metrics(TASKS[recipe.task.type], recipe.task) if recipe.task.type in TASKS else ()
    return next((f"eval/{name}" for name in FLOOR_METRICS if name in reported), "eval/accuracy")


def eval_metric_fields(recipe: Recipe) -> list[tuple[str, str]]:
    """(dotted field, metric) for every field naming an evaluation metric."""
    fields = []
    if recipe.train.early_stopping:
        fields.append(("train.early_stopping.metric", recipe.train.early_stopping.metric))
    if recipe.wise_ft:
        fields.append(("wise_ft.metric", recipe.wise_ft.metric))
    if recipe.retention and recipe.retention.floor is not None:
        fields.append(("retention.target_metric", floor_metric(recipe)))
    if recipe.tune:
        fields += [("tune.metric", metric) for metric in recipe.tune.metrics if metric.startswith("eval/")]
    return fields


def _check_roles(recipe: Recipe, task_cls) -> list[tuple[str, str]]:
    """The data sections map exactly the task's roles; label sets and buckets name label roles;
    metric fields name metrics the task reports."""
    options = recipe.task
    problems: list[tuple[str, str]] = []
    label_roles = task_label_roles(task_cls, options)
    sections = [("data", recipe.data, [task_roles(task_cls, options)], "")] + [
        (f"retention.references.{i}.data", reference.data, task_reference_roles(task_cls, options, reference.kind), reference.kind)
        for i, reference in enumerate(recipe.retention.references if recipe.retention else [])
    ]
    for prefix, data, alternatives, kind in sections:
        if not alternatives:
            problems.append((f"{prefix.removesuffix('.data')}.kind", f"task {recipe.task.type} has no {kind} reference"))
            continue
        problems += _mapped_roles(prefix, data.columns, alternatives, recipe.task.type)
    several = label_roles != ("label",) and label_roles != ()
    if several and isinstance(recipe.data.labels, list):
        problems.append(("data.labels", f"task {recipe.task.type} has the label roles {', '.join(label_roles)}: "
                                        "give one label set per role, {role: [labels]}"))
    if not several and isinstance(recipe.data.labels, dict):
        problems.append(("data.labels", f"task {recipe.task.type} has one label set: give a list of labels"))
    for field, named in (("data.labels", recipe.data.labels if several and isinstance(recipe.data.labels, dict) else {}),
                         ("data.other_label", recipe.data.other_label)):
        for role in named:
            if role not in label_roles:
                problems.append((f"{field}.{role}", f"not a label role of task {recipe.task.type}; label roles: {', '.join(label_roles) or 'none'}"))
    reported = [f"eval/{name}" for name in task_metrics(task_cls, options)]
    for path, metric in eval_metric_fields(recipe):
        if metric not in reported:
            problems.append((path, f"{metric!r} is not a metric task {recipe.task.type} reports; allowed: {', '.join(reported)}"))
    return problems


def _mapped_roles(prefix: str, columns: dict[str, str], alternatives: list[tuple[str, ...]], task: str) -> list[tuple[str, str]]:
    """The problems of a data section's column mapping against the role sets it may map (a role
    ending in ``?`` is optional): none if one fits, else those of the closest."""
    found = []
    for roles in alternatives:
        needed, allowed = [r for r in roles if not r.endswith("?")], [r.rstrip("?") for r in roles]
        missing, unknown = [r for r in needed if r not in columns], [r for r in columns if r not in allowed]
        problems = ([(f"{prefix}.columns", f"missing {', '.join(missing)} (task {task} needs {', '.join(needed)})")] if missing else []) + \
                   ([(f"{prefix}.columns", f"unknown role {', '.join(unknown)}; allowed: {', '.join(allowed)}")] if unknown else [])
        found.append((len(missing) + len(unknown), problems))
    return min(found, key=lambda item: item[0])[1]


def _owned_options(section: str, raw: BaseModel, options_cls: type[BaseModel], others: dict[str, type] | None = None
                   ) -> tuple[BaseModel | None, list[tuple[str, str]]]:
    """``raw`` (a section as the schema read it) as its owner's typed options, or the problems.
    A strategy field that another strategy's options have is named as that one's, not as unknown."""
    try:
        return options_cls.model_validate(raw.model_dump(exclude_unset=True)), []
    except ValidationError as error:
        problems = []
        for (path, message), item in zip(problems_of(error, section), error.errors()):
            field = str(item["loc"][0]) if item["loc"] else ""
            owners = [name for name, cls in (others or {}).items() if field in cls.Options.model_fields]
            if item["type"] == "extra_forbidden" and owners:
                message = f"applies to method {' / '.join(owners)}, not {raw.method}"
            problems.append((path, message))
        return None, problems


def _check_registered(recipe: Recipe) -> list[tuple[str, str]]:
    """Cross-checks against the registries: task, its options and columns, strategy and its
    options, backend and the backend's own checks of the recipe. Puts the typed options in place."""
    problems: list[tuple[str, str]] = []
    if recipe.task.type not in TASKS:
        problems.append(("task.type", f"unknown task {recipe.task.type!r}; allowed: {', '.join(sorted(TASKS))}"))
    else:
        task_cls = TASKS[recipe.task.type]
        options, found = _owned_options("task", recipe.task, task_cls.Options)
        problems += found
        if options is not None:
            recipe.task = options
        if options is not None or not hasattr(task_cls, "roles"):  # roles from options: only once they are valid
            problems += _check_roles(recipe, task_cls)
    if recipe.strategy.method not in STRATEGIES:
        problems.append(("strategy.method", f"unknown {recipe.strategy.method!r}; allowed: {', '.join(sorted(STRATEGIES))}"))
    else:
        options, found = _owned_options("strategy", recipe.strategy, STRATEGIES[recipe.strategy.method].Options, STRATEGIES)
        problems += found
        if options is not None:
            recipe.strategy = options
    if recipe.train.backend not in BACKENDS:
        problems.append(("train.backend", f"unknown {recipe.train.backend!r}; allowed: {', '.join(sorted(BACKENDS))}"))
    else:
        problems += BACKENDS[recipe.train.backend].check(recipe)
    return problems


def given_fields(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a raw dict of the fields that were given (defaults left out, as in a file),
    so that derived recipes (trials, the baseline) validate like the file the user wrote."""
    return recipe.model_dump(mode="json", exclude_unset=True)


def recipe_with(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw recipe ``base`` with the dotted-path ``values`` set."""
    data = copy.deepcopy(base)
    for path, value in values.items():
        set_field(data, path, value, source="tune.space")
    return data


def _type_problem(kind: str, annotation: Any) -> str | None:
    accepted = leaf_types(annotation)
    if kind in ("loguniform", "uniform") and float not in accepted:
        return f"{kind} samples floats; this field takes {_describe(accepted)}"
    if kind == "randint" and not accepted & {int, float}:
        return f"randint samples integers; this field takes {_describe(accepted)}"
    return None


def _describe(accepted: set[Any]) -> str:
    names = []
    for kind in accepted:
        if typing.get_origin(kind) is typing.Literal:
            names.append(" | ".join(map(str, typing.get_args(kind))))
        else:
            names.append(getattr(kind, "__name__", str(kind)))
    return " or ".join(sorted(names))


def check_space(recipe: Recipe) -> list[tuple[str, str]]:
    """Every problem of ``recipe.tune`` against the rest of the recipe, as (dotted path, message)."""
    problems: list[tuple[str, str]] = []
    tune = recipe.tune
    base = given_fields(recipe)
    base.pop("tune")
    for metric in tune.metrics:
        if metric.startswith(("ref/", "retention/")) and recipe.retention is None:
            problems.append(("tune.metric", f"{metric} needs a retention: section (references to measure)"))
    for path, dimension in tune.space.items():
        where = f"tune.space.{path}"
        section = path.split(".")[0]
        try:
            annotation = field_annotation(recipe, path)
        except KeyError as error:
            problems.append((where, f"unknown field {error.args[0]} in the recipe schema"))
            continue
        if section not in SEARCHABLE:
            problems.append((where, f"{section} cannot be searched (data, model and task are prepared once for all "
                                    f"trials; scaling is tune.workers_per_trial); searchable: {', '.join(SEARCHABLE)}"))
            continue
        problem = _type_problem(dimension.kind, annotation)
        if problem:
            problems.append((where, problem))
            continue
        for value in dimension.values:  # the bounds of a range, every listed value
            try:
                validate_recipe(recipe_with(base, {path: value}))
            except RecipeError as error:
                first_path, message = error.problems[0]
                problems.append((where, f"{dimension.kind} value {value!r} is not valid: {first_path}: {message}"))
                break
    return problems


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw recipe dict; raise RecipeError listing every problem."""
    try:
        recipe = Recipe(**data)
    except ValidationError as error:
        raise RecipeError(source, problems_of(error)) from None
    except TypeError as error:
        raise RecipeError(source, [("", str(error))]) from None
    problems = _check_registered(recipe)
    if recipe.tune and not problems:
        problems = check_space(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The validated recipe of a YAML file, with ``--set``-style ``overrides`` (``train.lr=3e-5``) applied."""
    recipe = validate_recipe(apply_overrides(read_recipe_file(path), list(overrides)), str(path))
    recipe._file = Path(path)
    return recipe


def read_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """(field, path) of every local file or folder a recipe reads, the recipe file itself first
    (assets and URIs left out): what a run folder must not hold."""
    found = [("the recipe", str(recipe.file))] if recipe.file else []
    sections = [("data", recipe.data)] + [(f"retention.references.{i}.data", reference.data)
                                          for i, reference in enumerate(recipe.retention.references if recipe.retention else [])]
    for prefix, data in sections:
        found += [(f"{prefix}.{name}", getattr(data, name)) for name in ("train", "validation", "test")]
    found += [("model.path", recipe.model.path), ("task.image_encoder", getattr(recipe.task, "image_encoder", None)),
              ("distill.teacher", recipe.distill.teacher if recipe.distill else None)]
    return [(field, path) for field, path in found if path and not path.startswith(ASSET_PREFIX) and "://" not in path]


def validate_derived(data: dict[str, Any], source: str, origins: dict[str, str]) -> Recipe:
    """``validate_recipe`` of a recipe derived from the user's (the baseline's, a trial's): a problem
    with a value taken from another field names that field, the one the user wrote (``origins``:
    derived dotted path -> the user's)."""
    try:
        return validate_recipe(data, source)
    except RecipeError as error:
        problems = [(origins[path], f"{message} (as {path} of the {source})") if path in origins else (path, message)
                    for path, message in error.problems]
        raise RecipeError(error.where, problems) from None


def derived_recipe(recipe: Recipe, values: dict[str, Any], source: str, origins: dict[str, str] | None = None) -> Recipe:
    """A recipe made from ``recipe`` with the dotted ``values`` set (the baseline's, a trial's),
    validated like a file, so a problem reads as the field it is, never as a traceback."""
    return validate_derived(recipe_with(given_fields(recipe), values), source, origins or {})
