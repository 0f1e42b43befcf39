"""Post-training steps on a finished run: compression, interpretability (and, across runs, fusion).

A step is a function ``step(run: FinishedRun, options) -> dict`` named in ``STEPS``; the name is
also its field in the recipe's ``post:`` section, whose (validated) value is ``options``. A step
writes what it makes under ``<run_dir>/post/`` and returns a JSON-able result, which lands in
``post/<name>.json`` for the summary table and the HTML report.
"""

from __future__ import annotations

import importlib
import json
import logging
from typing import Any

from raytune_ft import run_folder

logger = logging.getLogger(__name__)

STEPS = {
    "quantize": "raytune_ft.post.compression:quantize",
    "prune": "raytune_ft.post.compression:prune",
    "explain": "raytune_ft.post.explain:explain",
}


def configured_steps(recipe) -> list[str]:
    return [name for name in STEPS if getattr(recipe.post, name) is not None]


def run_steps(run, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the named steps (default: those the recipe configures) and write ``post/<name>.json``."""
    results = {}
    for name in names or configured_steps(run.recipe):
        options = run.recipe.post.options(name)
        module, _, function = STEPS[name].partition(":")
        logger.info("post: %s", name)
        results[name] = getattr(importlib.import_module(module), function)(run, options)
        (run.run_dir / run_folder.POST).mkdir(exist_ok=True)
        run_folder.write_text_atomic(run.run_dir / run_folder.POST / f"{name}.json", json.dumps(results[name], indent=2) + "\n")
    return results
