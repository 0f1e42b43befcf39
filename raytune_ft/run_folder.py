"""The run folder: what a run directory holds, and the rules for writing one.

A run directory (``output.dir``) is Ray's ``storage_path/name``: Ray keeps checkpoints there, and
the driver adds the files named below. This module owns those names and the policy around them:
a run is never overwritten (``--resume`` continues it, ``--force`` moves it aside, nothing is
deleted), a run folder is never one of the user's own (the working folder, a folder above it, one
holding the recipe or the data), files are written whole or not at all, the checkpoint to resume from is verified first,
and on shared storage (``output.storage_path``) the outputs are published beside the checkpoints.
Training, tuning, the post steps and the report import it; it imports nothing of theirs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from raytune_ft.errors import UserError
from raytune_ft.schema import Recipe, dotted, join_uri

logger = logging.getLogger(__name__)

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
BASELINE = "baseline"  # the head-only baseline's own run folder
FLOOR = "floor.json"  # retention.floor: the setting that met it, every setting explored, the front
SEARCH = "search"  # retention.floor: its Tune search over mitigations, an experiment folder
RESUMES = "resumes.jsonl"  # one line per resume: when, and the recipe changes it accepted


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file whole or not at all: a reader (or a resumed run) never sees half of it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def copy_dir_atomic(source: str | os.PathLike, target: Path) -> None:
    """Copy folder ``source`` to ``target``, replacing what was there: copied beside it first (a
    hidden ``.<name>.partial``), so ``target`` is never half a copy, and no glob of its siblings'
    names finds the copy in progress."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def shared_run_dir(recipe: Recipe, run_dir: Path) -> str | None:
    """The run's folder on shared storage, or None when Ray stores it in the run folder itself."""
    return join_uri(recipe.output.storage_root(run_dir), run_dir.name) if recipe.output.storage_path else None


def storage(location: str | Path):
    """(pyarrow filesystem, path) of a local path or a storage URI (s3://, gs://, an NFS path)."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise UserError("output.storage_path", f"cannot open {location}: {str(error).splitlines()[0]}") from None


def holds_run(location: str | Path) -> bool:
    """Whether a run folder (local, or on shared storage) holds anything."""
    from pyarrow import fs

    filesystem, path = storage(location)
    try:
        return bool(filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True)))
    except OSError as error:
        raise UserError("output.storage_path", f"cannot read {location}: {str(error).splitlines()[0]}") from None


def check_own_folder(run_dir: Path, inputs: Iterable[tuple[str, str | os.PathLike]] = (), field: str = "output.dir") -> None:
    """An output folder is one of its own: not the working folder, nor a folder above it, nor one
    that holds an input (``inputs``: (what, path), e.g. the recipe, the data, the model), which
    ``--force`` would move aside with it. ``field``: the option that named the folder."""
    run_dir = Path(run_dir).resolve()
    here = Path.cwd().resolve()
    if run_dir == here or run_dir in here.parents:
        what = "the working folder" if run_dir == here else f"a folder above the working folder {here}"
        raise UserError(field, f"{run_dir} is {what}; give the run a folder of its own, e.g. runs/<name>")
    for what, path in inputs:
        path = Path(path).expanduser().resolve()
        if path == run_dir or run_dir in path.parents:
            raise UserError(field, f"{run_dir} holds {what} ({path}); give the run a folder of its own, e.g. runs/<name>")


def check_run_dir(run_dir: Path, resume: bool, force: bool, shared: str | None = None,
                  inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> None:
    """Never overwrite a run: a second run into a directory needs --resume (continue) or --force;
    never a folder of the user's own (``check_own_folder``). With shared storage (``shared``: the
    run's folder there) the run lives there: it can be resumed from storage alone, and it is never
    overwritten, moved aside or deleted. Checked before anything is written, so a refused run
    leaves no trace."""
    check_own_folder(run_dir, inputs)
    if resume and force:
        raise UserError("--force", "cannot be combined with --resume (continue the run, or move it aside and start anew)")
    occupied = run_dir.exists() and any(run_dir.iterdir())
    stored = bool(shared) and holds_run(shared)
    if resume and not occupied and not stored:
        raise UserError("--resume", f"no run to resume in {run_dir}" + (f" nor in {shared}" if shared else ""))
    if stored and not resume:
        raise UserError("output.storage_path", f"{shared} already holds a run; pass --resume to continue it, "
                                               "or give the run another output.dir name")
    if occupied and not resume and not force:
        raise UserError("output.dir", f"{run_dir} already holds a run; pass --resume to continue it or --force to move it aside")
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError("output.dir", f"{run_dir} is not writable ({existing} is not a writable directory)")


def check_resume_checkpoint(location: str | Path) -> None:
    """The checkpoint Ray Train will resume from (the latest in its run snapshot, in the run's
    folder or on shared storage) must be whole. Ray registers a checkpoint only once every worker's
    files are in storage, so a write cut short is never in the snapshot; this catches a registered
    one damaged since, wherever it is stored."""
    from raytune_ft.checkpoint import verify_checkpoint
    from raytune_ft.ray_compat import run_snapshot_filename

    filesystem, root = storage(location)
    snapshot = f"{root.rstrip('/')}/{run_snapshot_filename()}"
    try:
        with filesystem.open_input_file(snapshot) as f:
            text = f.read()
    except (FileNotFoundError, OSError):
        return  # no checkpoint yet: the run starts its first epoch again
    try:
        latest = json.loads(text).get("latest_checkpoint_result")
        directory = f"{root.rstrip('/')}/{latest['checkpoint_dir_name']}" if latest else None
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError("--resume", f"{location}/{run_snapshot_filename()}: not Ray Train's run snapshot") from None
    try:
        if directory:
            verify_checkpoint(directory, filesystem)
    except ValueError as error:
        raise UserError("--resume", f"{error}; the checkpoint to resume from is damaged, nothing was changed "
                                    "(start anew with --force)") from None


def restore_from_storage(shared: str, run_dir: Path) -> None:
    """A run resumed from shared storage alone (the head and its disk gone): the driver's own files
    (recipe, summaries, metrics, the baseline's outputs) come back into the local run folder; the
    checkpoints stay in storage, where Ray Train resumes from them."""
    from pyarrow import fs

    filesystem, root = storage(shared)
    root = root.rstrip("/")
    for info in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        relative = info.path[len(root) + 1:]
        if info.type != fs.FileType.File or relative.split("/")[0].startswith("checkpoint_") or "/checkpoint_" in relative:
            continue
        target = run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.copy_files(info.path, str(target), source_filesystem=filesystem)
    logger.info("resuming from %s: the run's files restored into %s", shared, run_dir)


# What a checkpoint was made from: a resume that changes any of these would continue another run.
FIXED_ON_RESUME = ("task", "model", "data", "strategy", "retention", "train.backend", "train.seed", "train.batch_size",
                   "train.grad_accum", "train.precision", "deepspeed")


def resume_changes(run_dir: Path, recipe: Recipe, made_with: Recipe) -> list[dict[str, Any]]:
    """How ``recipe`` differs from ``made_with``, the recipe the run was made with (its
    ``recipe.yaml``), both as every field would be written. Refuses, naming the fields, a change to what the checkpoint was
    made from (task, model, data, strategy, retention references, backend, seed, batch, precision;
    the worker count where the backend shards the state); returns the others (more epochs, early
    stopping, evaluation settings, ...), to be recorded."""
    before, after = dotted(made_with.to_dict()), dotted(recipe.to_dict())
    fixed = FIXED_ON_RESUME + (("scaling.workers",) if recipe.train.backend != "ddp" else ())
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key) and not key.startswith(("name", "output.dir")))
    refused = [key for key in changed if any(key == field or key.startswith(field + ".") for field in fixed)]
    if refused:
        raise UserError("--resume", f"the checkpoint was made with another {', '.join(refused[:4])}{' ...' if len(refused) > 4 else ''} "
                                    f"(in {run_dir / RECIPE}); resume with the recipe it was made with, or start a new run")
    return [{"field": key, "before": before.get(key), "after": after.get(key)} for key in changed]


def record_resume(run_dir: Path, changes: list[dict[str, Any]]) -> None:
    """Append this resume, and the recipe changes it accepted, to ``resumes.jsonl``."""
    with open(run_dir / RESUMES, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes}) + "\n")


def resumes(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / RESUMES
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def move_aside(path: Path) -> Path:
    """Rename an existing output to ``<name>.old-<time>`` (``--force``): nothing a user has is deleted."""
    aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    logger.info("moved the existing %s to %s", path, aside)
    return aside


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> None:
    """Create the run directory (moving an existing run aside with --force) and check it is writable."""
    check_run_dir(run_dir, resume, force, inputs=inputs)
    if force and run_dir.exists() and any(run_dir.iterdir()):
        move_aside(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError("output.dir", f"{run_dir} is not writable ({error.strerror})") from None


def publish(run_dir: Path, destination: str, relative: str = "") -> None:
    """Copy the driver's outputs (or the one file or folder ``relative``) beside the checkpoints on
    shared storage: at the start (the recipe), after the baseline and at the end, so a resume from
    storage finds what the run had done."""
    from pyarrow import fs

    filesystem, root = storage(destination)
    source = run_dir / relative if relative else run_dir
    target = f"{root.rstrip('/')}/{relative}" if relative else root
    if source.is_dir():
        fs.copy_files(str(source), target, destination_filesystem=filesystem)
    else:
        filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.copy_files(str(source), target, destination_filesystem=filesystem)


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
