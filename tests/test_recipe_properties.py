"""Any value in any recipe field: ``raytune-ft validate`` answers 0 (valid) or 2 (one line per
problem, a few at most), never a traceback.

The fields come from walking the schema (every section, the text task's options, every strategy's
options, a retention reference's data); the values are the kinds that broke recipes before:
infinities, NaN, negatives, numbers past 64 bits, empty and odd text, wrong types and wrong nesting.
The command runs in-process (``raytune_ft.cli.main``), so an example costs milliseconds when the
schema refuses it and the planning checks (data, model, strategy) when it does not.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from conftest import tiny_recipe_dict, with_topic_reference, write_recipe
from raytune_ft.errors import RecipeError
from raytune_ft.schema import Recipe, leaf_types, set_field
from raytune_ft.strategies import STRATEGIES
from raytune_ft.tasks import TASKS

# A model path the generator writes (a word, a number) must not send transformers to the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted field of ``model``, sections and their fields alike; a list of sections by its
    first item (``retention.references.0``); the task's and strategies' own options under theirs."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        paths.append(path)
        for kind in leaf_types(info.annotation):
            args = typing.get_args(kind)
            if path == "task":
                paths += field_paths(TASKS["text_classification"].Options, path)
            elif path == "strategy":
                paths += sorted({p for cls in STRATEGIES.values() for p in field_paths(cls.Options, path)})
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                paths += field_paths(kind, path)
            elif typing.get_origin(kind) is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                paths += field_paths(args[0], f"{path}.0")
    return sorted(set(paths))


FIELDS = field_paths(Recipe)
ODD = [float("inf"), float("-inf"), float("nan"), -1, 0, -1e308, 1e308, 2**64, -(2**63) - 5, 2**32, 10**30, "", " ", "..",
       "x" * 300, True, None, [], {}, [1, "a"], {"a": 1}, {"a": {"b": float("nan")}}, [[float("inf")]]]
VALUES = st.one_of(st.sampled_from(ODD), st.integers(min_value=-(2**80), max_value=2**80),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))


@pytest.fixture(scope="module")
def base_recipe(tiny_bert, sentiment_data, topic_data, tmp_path_factory) -> dict:
    """The tiny recipe with every optional section a field can land in: a reference, early
    stopping, WiSE-FT, a search space, the post steps."""
    recipe = with_topic_reference(tiny_recipe_dict(tiny_bert, sentiment_data, tmp_path_factory.mktemp("props") / "run"), topic_data)
    recipe["train"]["early_stopping"] = {"metric": "eval/accuracy", "mode": "max"}
    recipe["wise_ft"] = {"alphas": [0.5, 1.0], "min_retention": 0.0}
    recipe["tune"] = {"space": {"train.lr": {"choice": [1e-3, 3e-3]}}}
    recipe["post"] = {"quantize": {}, "prune": {}, "explain": {}}
    return recipe


def validate(path) -> tuple[int, str]:
    """``raytune-ft validate PATH`` in this process: (exit code, stderr)."""
    from raytune_ft.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["raytune-ft", "validate", str(path)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exited:
        code = exited.code or 0
    finally:
        sys.argv = argv
    return code, err.getvalue()


def test_the_walk_reaches_every_section():
    for path in ("name", "task.max_length", "strategy.rank", "train.early_stopping.patience", "scaling.max_wait_s",
                 "retention.references.0.data.validation_fraction", "tune.asha.reduction_factor", "post.prune.sparsity",
                 "output.mlflow.tracking_uri", "deepspeed.config", "distill.temperature"):
        assert path in FIELDS, path


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=2))
def test_any_value_in_any_field_validates_or_is_refused_in_a_few_lines(changes, base_recipe, tmp_path_factory):
    import copy

    recipe = copy.deepcopy(base_recipe)
    for path, value in changes:
        try:
            set_field(recipe, path, copy.deepcopy(value))
        except RecipeError:  # a path below a scalar the other change set: --set refuses it the same way
            return
    code, stderr = validate(write_recipe(recipe, tmp_path_factory.mktemp("example") / "r.yaml"))
    assert code in (0, 2), stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) <= 6, stderr
    assert code == 0 or stderr.startswith("error: "), stderr
