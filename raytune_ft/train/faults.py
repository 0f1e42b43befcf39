"""Fault injection for the reliability tests: crash or kill a worker at a chosen point, once.

Set ``RAYTUNE_FT_FAULT`` on the driver (it travels in the loop config, and to every Tune trial), e.g.
``raise_after_epoch:1`` (rank 0 raises right after epoch 1's checkpoint is reported) or
``kill_at_step:5`` (rank 1, or 0 alone, kills its own process mid-epoch) or ``stall_at_step:5``
(rank 1 writes its node's id into the marker and waits there, for a test to remove that node
from the cluster: a lost machine, not a lost process) or ``kill_in_checkpoint:2`` (rank 0, which
writes the replicated state, kills its own process halfway through writing epoch 2's checkpoint:
the weights written, the trainer state not). The fault fires once
per run directory: a marker file there stops it firing again after the restart. A fault first waits
until the Train controller has taken every report already made, so the restart deterministically
picks up from the last reported checkpoint (a real kill may land earlier and lose that one).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any


FAULT_ENV = "RAYTUNE_FT_FAULT"
FAULT_MARKER = ".fault_fired"  # in the run directory: the fault has fired (and names the stalled node)


def fault_config(run_dir: Path) -> dict[str, Any]:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return {}
    kind, _, at = spec.partition(":")
    return {"kind": kind, "at": int(at), "marker": str(run_dir / FAULT_MARKER)}


def maybe_fail(fault: dict[str, Any], world: int, step: int, epoch: int, rank: int, after_checkpoint: bool = False,
               in_checkpoint: bool = False) -> None:
    """Fire the injected fault (``fault_config``) if this is its point, once per run directory."""
    if not fault or Path(fault["marker"]).exists():
        return
    victim = 1 if world > 1 else 0
    if fault["kind"] == "kill_in_checkpoint" and in_checkpoint and epoch == fault["at"] and rank == 0:
        wait_until_reports_taken()
        Path(fault["marker"]).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if in_checkpoint:
        return
    if fault["kind"] == "raise_after_epoch" and after_checkpoint and epoch == fault["at"] and rank == 0:
        wait_until_reports_taken()
        Path(fault["marker"]).touch()
        raise RuntimeError(f"injected fault after epoch {epoch}")
    if fault["kind"] == "kill_at_step" and not after_checkpoint and step == fault["at"] and rank == victim:
        wait_until_reports_taken()
        Path(fault["marker"]).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if fault["kind"] == "stall_at_step" and not after_checkpoint and step == fault["at"] and rank == victim:
        import ray

        wait_until_reports_taken()
        marker = Path(fault["marker"])
        marker.with_suffix(".tmp").write_text(ray.get_runtime_context().get_node_id())
        marker.with_suffix(".tmp").rename(marker)  # whole, or not there: the test reads the node id
        time.sleep(600)  # until the node is removed under this process


def wait_until_reports_taken(timeout_s: float = 60.0) -> None:
    """Block until this worker's reports have all been handed to the controller (it polls every ~2 s)."""
    from raytune_ft.ray_compat import reports_taken

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if reports_taken():
            time.sleep(1.0)  # the controller registers the checkpoint right after taking the report
            return
        time.sleep(0.1)
