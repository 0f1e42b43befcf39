"""Fault injection for the reliability tests: crash or kill a worker at a chosen point, once.

Set ``RAYTUNE_FT_FAULT`` on the driver (it travels in the loop config), e.g.
``raise_after_epoch:1`` (rank 0 raises right after epoch 1's checkpoint is reported) or
``kill_at_step:5`` (rank 1, or 0 alone, kills its own process mid-epoch). The fault fires once
per run directory: a marker file there stops it firing again after the restart.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any


def fault_config(run_dir: Path) -> dict[str, Any]:
    spec = os.environ.get("RAYTUNE_FT_FAULT", "")
    if not spec:
        return {}
    kind, _, at = spec.partition(":")
    return {"kind": kind, "at": int(at), "marker": str(run_dir / ".fault_fired")}


def maybe_fail(config: dict[str, Any], step: int, epoch: int, rank: int, after_checkpoint: bool = False) -> None:
    fault = config.get("fault")
    if not fault or Path(fault["marker"]).exists():
        return
    victim = 1 if config["world_size"] > 1 else 0
    if fault["kind"] == "raise_after_epoch" and after_checkpoint and epoch == fault["at"] and rank == 0:
        Path(fault["marker"]).touch()
        raise RuntimeError(f"injected fault after epoch {epoch}")
    if fault["kind"] == "kill_at_step" and not after_checkpoint and step == fault["at"] and rank == victim:
        Path(fault["marker"]).touch()
        os.kill(os.getpid(), signal.SIGKILL)
