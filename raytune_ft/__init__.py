"""raytune_ft: fine-tune pretrained models at cluster scale on Ray, measuring what they keep.

The public API. Everything else is internal and may change::

    import raytune_ft as rt

    recipe = rt.load_recipe("jobs/text_classification.yaml", ["train.epochs=1"])
    summary = rt.run(recipe)                      # one run: Ray Train, the baseline, the report
    print(summary["test"]["accuracy"], summary["retention"]["retention"])

The names are imported on first use, so ``import raytune_ft`` stays cheap (the command line
imports it on every call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from raytune_ft.schema import Recipe

__all__ = ["Recipe", "load_recipe", "run", "tune", "register_task", "register_strategy", "register_addon", "register_backend"]


def load_recipe(path: str, overrides: list[str] = ()) -> "Recipe":
    """The validated, typed recipe of a YAML file, with ``--set``-style ``overrides`` applied.

    Example: ``load_recipe("jobs/text_classification.yaml", ["train.lr=3e-5", "scaling.workers=4"])``.
    Raises ``raytune_ft.errors.RecipeError`` naming every bad field at once."""
    from raytune_ft.recipe import load_recipe as load

    return load(path, overrides)


def run(recipe: "Recipe", *, resume: bool = False, force: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run a recipe end to end (the baseline, Ray Train, the post steps, the report) and return
    its summary (``summary.json``): test metrics, gain over the baseline, retention, timings.

    Example: ``run(load_recipe("jobs/text_classification.yaml"), force=True)["gain"]``.
    ``address``: a Ray cluster (default ``RAY_ADDRESS``, else an embedded local Ray).
    With ``retention.floor`` set, the run meets the floor (``raytune_ft.search.floor``): the
    summary's ``floor`` names the delivered setting; ``FloorNotMet`` when nothing met it."""
    if recipe.retention and recipe.retention.floor is not None:
        from raytune_ft.search.floor import run_floor as run_recipe
    else:
        from raytune_ft.train.runner import run as run_recipe

    return run_recipe(recipe, resume=resume, force=force, address=address)


def tune(recipe: "Recipe", *, resume: bool = False, force: bool = False, address: str | None = None) -> dict[str, Any]:
    """Search the recipe's ``tune:`` space with Ray Tune, each trial a Ray Train run; returns the
    experiment's summary (every trial's row, the best trial, the Pareto front with two metrics).

    Example: ``tune(load_recipe("jobs/text_classification.yaml", ["tune.num_samples=4"]))["best"]``."""
    from raytune_ft.search.experiment import run_experiment

    return run_experiment(recipe, resume=resume, force=force, address=address)


def register_task(cls):
    """Class decorator: a task, usable in recipes as ``task.type: <cls.name>`` (see ``raytune_ft.tasks.Task``).

    Example::

        @register_task
        class MyTask:
            name = "my_task"
            columns = ("text", "label")
            class Options(raytune_ft.schema.TaskOptions): ...
    """
    from raytune_ft.tasks import register

    return register(cls)


def register_strategy(cls):
    """Class decorator: a strategy, usable as ``strategy.method: <cls.name>`` (see ``raytune_ft.strategies.Strategy``).

    Example: ``@register_strategy class BitFit(raytune_ft.strategies.Full): name = "bitfit"`` with its own ``select``."""
    from raytune_ft.strategies import register

    return register(cls)


def register_addon(cls):
    """Class decorator: an add-on of the training loop, switched on by its recipe ``section``
    (see ``raytune_ft.addons.AddOn``: loss term, epoch metrics, checkpoint files, final scores).

    Example: ``@register_addon class Replay(raytune_ft.addons.AddOn): section = "replay"``."""
    from raytune_ft.addons import register

    return register(cls)


def register_backend(cls):
    """Class decorator: a training backend, usable as ``train.backend: <cls.name>`` (see ``raytune_ft.backends``).

    Example: ``@register_backend class FSDPBackend: name = "fsdp"`` with the DDP backend's methods."""
    from raytune_ft.backends import register

    return register(cls)


def __getattr__(name: str) -> Any:
    if name == "Recipe":
        from raytune_ft.schema import Recipe

        return Recipe
    raise AttributeError(f"module 'raytune_ft' has no attribute {name!r}")
