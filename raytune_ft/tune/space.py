"""The search space: recipe fields by dotted path, checked against the Recipe schema before any
trial starts, and turned into Ray Tune domains.

Only fields a trial can change are searchable: data, model and task are prepared once on the
driver and shared by every trial, and scaling is set by ``tune.workers_per_trial``.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from raytune_ft.errors import RecipeError
from raytune_ft.recipe import Recipe, set_field, validate_recipe

SEARCHABLE = ("strategy", "train", "regularizer", "replay", "wise_ft")


def _leaf_types(annotation: Any) -> set[Any]:
    """The types a field accepts, Optional and unions unwrapped (None dropped)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_leaf_types(arg) for arg in typing.get_args(annotation) if arg is not type(None)))
    return {annotation}


def field_annotation(path: str) -> Any:
    """The annotation of a dotted Recipe path; raises KeyError naming the first unknown part."""
    node: Any = Recipe
    for i, key in enumerate(path.split(".")):
        models = [t for t in _leaf_types(node) if isinstance(t, type) and issubclass(t, BaseModel)]
        containers = [t for t in _leaf_types(node) if typing.get_origin(t) in (list, dict)]
        if models and key in models[0].model_fields:
            node = models[0].model_fields[key].annotation
        elif containers and (typing.get_origin(containers[0]) is dict or key.isdigit()):
            node = typing.get_args(containers[0])[-1]
        else:
            raise KeyError(".".join(path.split(".")[: i + 1]))
    return node


def _type_problem(kind: str, annotation: Any) -> str | None:
    accepted = _leaf_types(annotation)
    if kind in ("loguniform", "uniform") and float not in accepted:
        return f"{kind} samples floats; this field takes {_describe(accepted)}"
    if kind == "randint" and not accepted & {int, float}:
        return f"randint samples integers; this field takes {_describe(accepted)}"
    return None


def _describe(accepted: set[Any]) -> str:
    names = []
    for kind in accepted:
        if typing.get_origin(kind) is Literal:
            names.append(" | ".join(map(str, typing.get_args(kind))))
        else:
            names.append(getattr(kind, "__name__", str(kind)))
    return " or ".join(sorted(names))


def check_space(recipe) -> list[tuple[str, str]]:
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
            annotation = field_annotation(path)
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


def given_fields(recipe) -> dict[str, Any]:
    """The recipe as a raw dict of the fields that were given (defaults left out, as in a file),
    so that cross-field checks such as strategy options see only what the user set."""
    return recipe.model_dump(mode="json", exclude_unset=True)


def recipe_with(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw recipe ``base`` with the dotted-path ``values`` set."""
    data = copy.deepcopy(base)
    for path, value in values.items():
        set_field(data, path, value, source="tune.space")
    return data


def param_space(tune) -> dict[str, Any]:
    """Ray Tune domains, keyed by dotted recipe path."""
    from ray import tune as ray_tune

    domains = {
        "loguniform": lambda v: ray_tune.loguniform(v[0], v[1]),
        "uniform": lambda v: ray_tune.uniform(v[0], v[1]),
        "randint": lambda v: ray_tune.randint(v[0], v[1] + 1),  # ours includes high, Tune's excludes it
        "choice": ray_tune.choice,
        "grid": ray_tune.grid_search,
    }
    return {path: domains[dimension.kind](dimension.values) for path, dimension in tune.space.items()}


def mutations(tune) -> dict[str, Any]:
    """PBT's hyperparam_mutations: lists for choice and grid (explore moves to a neighbour),
    Tune domains for ranges (explore scales by 0.8 or 1.2)."""
    domains = param_space(tune)
    return {path: list(dimension.values) if dimension.kind in ("choice", "grid") else domains[path]
            for path, dimension in tune.space.items()}
