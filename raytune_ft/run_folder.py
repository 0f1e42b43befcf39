"""The run folder: what a run directory holds, and the rules for writing one.

A run directory (``output.dir``) is Ray's ``storage_path/name``: Ray keeps checkpoints there, and
the driver adds the files named below. This module owns those names and the policy around them:
a run is never overwritten (``--resume`` continues it, ``--force`` moves it aside, nothing is
deleted), files are written whole or not at all, the checkpoint to resume from is verified first,
and on shared storage (``output.storage_path``) the outputs are published beside the checkpoints.
Training, tuning, the post steps and the report import it; it imports nothing of theirs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from raytune_ft.errors import UserError

RECIPE = "recipe.yaml"  # the validated recipe, every default spelled out
SUMMARY = "summary.json"  # written last: its presence means the run finished
METRICS = "metrics.jsonl"  # one line per report
MODEL = "model"  # the exported save_pretrained directory
ADAPTER = "adapter"  # LoRA: the PEFT adapter alone, for PeftModel.from_pretrained on the base model
PLOTS = "plots"
GENERATIONS = "generations.md"  # a language model's answers to held-out prompts, before and after training
POST = "post"  # one <step>.json per post-training step
REPORT = "report.html"
TRIALS = "trials"  # a tune experiment's trial run directories: trials/<trial>/run


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file whole or not at all: a reader (or a resumed run) never sees half of it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Never overwrite a run: a second run into a directory needs --resume (continue) or --force.
    Checked before anything is written, so a refused run leaves no trace."""
    if resume and force:
        raise UserError("--force", "cannot be combined with --resume (continue the run, or move it aside and start anew)")
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if resume and not occupied:
        raise UserError("--resume", f"no run to resume in {run_dir}")
    if occupied and not resume and not force:
        raise UserError("output.dir", f"{run_dir} already holds a run; pass --resume to continue it or --force to move it aside")
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError("output.dir", f"{run_dir} is not writable ({existing} is not a writable directory)")


def check_resume_checkpoint(run_dir: Path) -> None:
    """The checkpoint Ray Train will resume from (the latest in its run snapshot) must be whole.
    Ray registers a checkpoint only once every worker's files are in storage, so a write cut
    short is never in the snapshot; this catches a registered one damaged since."""
    from raytune_ft.checkpoint import verify_checkpoint
    from raytune_ft.ray_compat import run_snapshot_filename

    snapshot = run_dir / run_snapshot_filename()
    if not snapshot.is_file():
        return
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        directory = run_dir / latest["checkpoint_dir_name"] if latest else None
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError("--resume", f"{snapshot}: not Ray Train's run snapshot") from None
    try:
        if directory:
            verify_checkpoint(directory)
    except ValueError as error:
        raise UserError("--resume", f"{error}; the checkpoint to resume from is damaged, nothing was changed "
                                    "(start anew with --force)") from None


def move_aside(path: Path) -> Path:
    """Rename an existing output to ``<name>.old-<time>`` (``--force``): nothing a user has is deleted."""
    aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    print(f"[raytune-ft] moved the existing {path} to {aside}")
    return aside


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Create the run directory (moving an existing run aside with --force) and check it is writable."""
    check_run_dir(run_dir, resume, force)
    if force and run_dir.exists() and any(run_dir.iterdir()):
        move_aside(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError("output.dir", f"{run_dir} is not writable ({error.strerror})") from None


def check_shared_storage(destination: str, resume: bool) -> None:
    """A run on shared storage is never overwritten either; it is never moved aside or deleted."""
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(destination)
        occupied = bool(filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True)))
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise UserError("output.storage_path", f"cannot open {destination}: {str(error).splitlines()[0]}") from None
    if occupied and not resume:
        raise UserError("output.storage_path", f"{destination} already holds a run; pass --resume to continue it, "
                                               "or give the run another output.dir name")


def publish_outputs(run_dir: Path, destination: str) -> None:
    """Copy the driver's outputs beside the checkpoints on shared storage."""
    from pyarrow import fs

    fs.copy_files(str(run_dir), destination)
    print(f"[raytune-ft] outputs copied to {destination}", flush=True)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's (or tune experiment's) summary; a one-line error when there is none."""
    if not run_dir.is_dir():
        raise UserError(str(run_dir), "not a directory; give the run directory (output.dir) of a finished run")
    path = run_dir / SUMMARY
    if not path.is_file():
        raise UserError(str(path), "missing; is this the directory of a finished run?")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(str(path), "not valid JSON") from None


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run, or None while it has none."""
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def post_results(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every post step's result a run directory holds, by step name."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(run_dir, POST).glob("*.json"))}
