"""A one-worker run of the loop in the calling process: what a Tune trial with one worker runs in
its own actor.

A Ray Train run starts six processes before the loop's first line (its controller, the
placement-group cleaner, the synchronisation and dataset actors, the worker importing torch and
transformers): on a small machine, most of a short trial's start-up (``make bench-tune``). In
process, the loop runs as in Ray Train's local mode (rank 0 of 1), and what a Train run does with
its reports is done here: each checkpoint is copied into the run's storage folder under the name
the loop gives it (the newest ``output.checkpoints_to_keep`` kept), and the callbacks see every
report. A retried trial (a new actor) continues from the newest checkpoint there.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from raytune_ft.checkpoint import TRAINER_STATE
from raytune_ft.ray_compat import run_in_process
from raytune_ft.run_folder import copy_dir_atomic


def checkpoints(storage: Path) -> list[Path]:
    """The whole checkpoints in ``storage``, oldest first."""
    return [state.parent for state in sorted(storage.glob(f"checkpoint_*/{TRAINER_STATE}"), key=lambda path: path.stat().st_mtime)]


def newest_checkpoint(storage: Path):
    """The newest whole checkpoint in ``storage`` (None: none yet)."""
    import ray.train

    found = checkpoints(storage)
    return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None


def fit_in_process(train_fn: Callable[[dict], None], config: dict[str, Any], datasets: dict[str, Any], storage: Path,
                   keep: int | None, callbacks: list[Any]):
    """Run ``train_fn(config)`` here with ``datasets`` as its shards; returns the last checkpoint,
    persisted in ``storage``."""
    import ray.train

    storage.mkdir(parents=True, exist_ok=True)
    kept = checkpoints(storage)  # an earlier attempt's count too, as a Train run's checkpoint manager keeps them
    last = None

    def on_report(metrics: dict[str, Any], checkpoint, name: str | None) -> None:
        nonlocal last
        persisted = None
        if checkpoint is not None:
            target = storage / name
            copy_dir_atomic(checkpoint.path, target)
            persisted = last = ray.train.Checkpoint.from_directory(str(target))
            kept.append(target)
            while keep and len(kept) > keep:
                shutil.rmtree(kept.pop(0), ignore_errors=True)
        for callback in callbacks:
            callback.after_report(None, [metrics], persisted)

    run_in_process(lambda: train_fn(config), {name: dataset.iterator() for name, dataset in datasets.items()}, on_report)
    return last
