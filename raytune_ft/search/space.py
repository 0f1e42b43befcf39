"""The search space as Ray Tune domains: recipe fields by dotted path (checked against the
recipe when it is loaded, ``raytune_ft.recipe.check_space``)."""

from __future__ import annotations

from typing import Any


def by_index(dimension) -> bool:
    """Whether Tune gets this dimension's value indices rather than its values: a choice or grid
    of sections (dicts) or lists, which Tune would take apart as nested search paths (and
    Optuna cannot sample). Trials and result rows map them back (``decoded``)."""
    return dimension.kind in ("choice", "grid") and any(isinstance(value, (dict, list)) for value in dimension.values)


def tune_values(tune, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (dotted path -> a value of its dimension) as Tune sees them."""
    return {path: tune.space[path].values.index(value) if by_index(tune.space[path]) else value for path, value in values.items()}


def decoded(tune, config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial config (dotted path -> sampled) as recipe values."""
    return {path: tune.space[path].values[value] if path in tune.space and by_index(tune.space[path]) and isinstance(value, int) else value
            for path, value in config.items()}


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
    return {path: domains[dimension.kind](list(range(len(dimension.values))) if by_index(dimension) else dimension.values)
            for path, dimension in tune.space.items()}


def mutations(tune) -> dict[str, Any]:
    """PBT's hyperparam_mutations: lists for choice and grid (explore moves to a neighbour),
    Tune domains for ranges (explore scales by 0.8 or 1.2)."""
    domains = param_space(tune)
    return {path: list(dimension.values) if dimension.kind in ("choice", "grid") else domains[path]
            for path, dimension in tune.space.items()}
