"""Hyperparameter search: a recipe's ``tune:`` space searched by Ray Tune, one Ray Train run per trial.

The package is ``search``, not ``tune``: a subpackage ``raytune_ft.tune`` would replace the public
function ``raytune_ft.tune`` with itself as soon as anything imported it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytune_ft.errors import UserError

if TYPE_CHECKING:
    from raytune_ft.schema import Recipe


def require_search(recipe: Recipe) -> None:
    """A recipe ``raytune-ft tune`` can run: one with a ``tune:`` section."""
    if recipe.tune is None:
        raise UserError("tune", "the recipe has no tune: section (the search space); see docs/tuning.md")
