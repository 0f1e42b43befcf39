"""The one loop on real Ray Train: 2 DDP workers, a tiny BERT, real checkpoints and resume."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, Payload, cli, run_in_fixture, snapshot, tiny_recipe_dict, write_recipe
from raytune_ft import run
from raytune_ft.recipe import validate_recipe
from raytune_ft.train.faults import FAULT_ENV, FAULT_MARKER


@pytest.fixture(scope="module")
def ddp_run(tiny_bert, sentiment_data, local_ray, tmp_path_factory) -> tuple[dict, dict]:
    """The tiny recipe run once, uninterrupted, by 2 DDP workers: (recipe dict, summary). Early
    stopping waits for an improvement with patience to spare, so the best weights travel with
    every checkpoint (the resume test's reference run covers that path too)."""
    recipe = tiny_recipe_dict(tiny_bert, sentiment_data, tmp_path_factory.mktemp("ddp") / "run")
    recipe["train"]["early_stopping"] = {"metric": "eval/accuracy", "mode": "max", "patience": 10}
    return recipe, run_in_fixture(lambda force: run(validate_recipe(recipe), force=force))


def test_two_worker_ddp_run_learns_and_writes_outputs(ddp_run):
    summary = ddp_run[1]
    run_dir = Path(summary["outputs"]["run_dir"])

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in history if "train/loss" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3, 4, 5, 6]  # one row per epoch, none twice
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert summary["test"]["accuracy"] > 0.8  # chance is 0.5
    assert summary["test"]["count"] == 96  # sharded evaluation drops and repeats no row
    assert 0 <= summary["data_wait_fraction"] < 1 and summary["train_samples_per_s"] > 0
    assert (run_dir / "plots" / "learning_curves.png").stat().st_size > 0
    assert (run_dir / "plots" / "confusion_matrix.png").stat().st_size > 0

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    inputs = tokenizer(["the drug was excellent for me", "the drug was dreadful for me"], return_tensors="pt", padding=True)
    predicted = model(**inputs).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == ["positive", "negative"]


def test_the_driver_prepares_a_one_block_split_as_ray_datas_tasks_do(tiny_recipe, local_ray, monkeypatch):
    """A small split is preprocessed on the driver; the same recipe with every split over the
    driver's limit goes through Ray Data's readers and tasks. Both give each worker the same train
    rows in the same order, the same evaluation rows, and count the same rows read. (A retention
    reference's splits take the same function.)"""
    from raytune_ft.data import tabular
    from raytune_ft.data.sharding import ExactEvalDataConfig
    from raytune_ft.train.datasets import prepare_datasets
    from raytune_ft.train.planning import plan_run

    tiny_recipe["data"].update(max_rows=150, on_bad_rows="skip")
    recipe = validate_recipe(tiny_recipe)

    def shards() -> dict[str, list[list[str]]]:
        """Each dataset's rows per worker, in order, each row as text."""
        prepared = prepare_datasets(recipe, plan_run(recipe))
        assert prepared.bad_rows == {"train": 0, "validation": 0, "test": 0}
        return {name: [[repr({key: np.asarray(value).tolist() for key, value in row.items()}) for row in split.take_all()] for split in splits]
                for name, splits in ExactEvalDataConfig(prepared.datasets, 2).splits.items()}

    on_driver = shards()
    monkeypatch.setattr(tabular, "SMALL_DATA_BYTES", 0)
    recipe.data.cache = "always"  # cached still, as a small split is
    by_ray_data = shards()
    assert on_driver.keys() == by_ray_data.keys() == {"train", "validation", "test"}
    assert on_driver["train"] == by_ray_data["train"] and len(on_driver["train"][0]) == len(on_driver["train"][1]) > 50
    for name in on_driver:
        assert sorted(sum(on_driver[name], [])) == sorted(sum(by_ray_data[name], [])), name
        assert all(on_driver[name]), name  # every worker has a share


@pytest.mark.e2e  # the fast tier's one end-to-end run (make test-fast)
def test_the_command_line_shows_progress_and_ends_with_the_summary_table(finished_text_run):
    """What `raytune-ft run` prints: live progress lines, each epoch's metrics, the closing table
    and where the outputs are; not Ray Data's hint to turn on the progress bars raytune-ft keeps off."""
    output = (finished_text_run.parent / "cli_output.txt").read_text()
    assert re.search(r"\[raytune-ft\] epoch 1 step \d+/\d+ loss [\d.]+ lr \S+ [\d.]+ samples/s data-wait \d+%", output)
    assert re.search(r"\[raytune-ft\] epoch 3 done: train/loss [\d.]+, eval/loss", output)
    assert re.search(r"training rows, 1 worker x batch 8, 120 steps \(40/epoch\)", output)
    assert re.search(r"^test accuracy +\S+ +[\d.]+", output, re.MULTILINE)
    assert re.search(r"^time \d+ s \(training \d+ s\), [\d.]+ samples/s, data wait [\d.]+%, 3 epochs / 120 steps on 1 worker \(ddp\)$",
                     output, re.MULTILINE)
    assert re.search(rf"^outputs: {re.escape(str(finished_text_run))} ", output, re.MULTILINE)
    assert "Progress bars disabled" not in output


def test_resume_after_crash_matches_uninterrupted_run(ddp_run, tmp_path, cli_in_process, cli_on_test_ray, monkeypatch):
    """Epoch 1 checkpoints, then the run crashes (the command line: exit 1, the workers' error
    as the last line); --resume goes on, and a worker process SIGKILLed mid-epoch 3 (rank 1) makes
    Train restart the worker group from epoch 2's checkpoint within that run (train.max_failures).
    The final weights equal the uninterrupted run's with the same seed (same data order,
    optimizer and schedule state), through both kinds of restart."""
    recipe, straight = ddp_run
    recipe = {**recipe, "output": {**recipe["output"], "dir": str(tmp_path / "resumed")}}
    recipe_path = write_recipe(recipe, tmp_path / "tiny.yaml")

    with monkeypatch.context() as faulty:
        faulty.setenv("RAYTUNE_FT_FAULT", "raise_after_epoch:1")
        code, stderr = cli_on_test_ray("run", str(recipe_path))
    assert code == 1
    assert stderr.strip().splitlines()[-1] == "error: training failed: RuntimeError: injected fault after epoch 1"
    import ray  # the failed run shut its Ray down; the one started again while the fault was set is free of it
    assert ray.get(ray.remote(lambda: os.environ.get(FAULT_ENV)).remote()) is None
    code, stderr = cli_in_process("run", str(recipe_path))
    assert code == 2 and "--resume" in stderr  # never silently overwritten
    (tmp_path / "resumed" / FAULT_MARKER).unlink()  # the crash's marker: the kill below may fire once too
    monkeypatch.setenv("RAYTUNE_FT_FAULT", "kill_at_step:45")  # 20 steps an epoch: mid-epoch 3
    resumed = run(validate_recipe({**recipe, "train": {**recipe["train"], "max_failures": 1}}), resume=True)
    assert (tmp_path / "resumed" / FAULT_MARKER).exists()
    assert resumed["resumed_at"] == [{"epoch": 1, "step": 20}, {"epoch": 2, "step": 40}]

    a = load_file(Path(straight["outputs"]["model"]) / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if "train/loss" in row] == [1, 2, 3, 4, 5, 6]


def test_a_worker_killed_while_writing_a_checkpoint_costs_nothing(ddp_run, tmp_path, monkeypatch):
    """Rank 0 is SIGKILLed halfway through writing epoch 2's checkpoint (its weights written, its
    trainer state not): the half-written checkpoint is never reported, Train restarts the group
    from epoch 1's (train.max_failures), and the run ends with the uninterrupted run's weights.
    The restarted attempt's checkpoints have names of their own, so nothing merges into a folder
    an earlier attempt left. Once the run returns, its Train controller is gone too, and Ctrl-C is
    handled as before it (Train's handler, which held the controller, is not left installed)."""
    import ray
    from ray.util.state import list_actors

    recipe, straight = ddp_run
    recipe = {**recipe, "output": {**recipe["output"], "dir": str(tmp_path / "killed")}, "train": {**recipe["train"], "max_failures": 1}}
    monkeypatch.setenv(FAULT_ENV, "kill_in_checkpoint:2")
    handler = signal.getsignal(signal.SIGINT)
    summary = run(validate_recipe(recipe))
    assert signal.getsignal(signal.SIGINT) is handler
    context = ray.get_runtime_context()  # this test process's Ray, by address: the other test process runs one too
    deadline = time.monotonic() + 60
    while list_actors(address=context.gcs_address,
                      filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE"), ("job_id", "=", context.get_job_id())]):
        assert time.monotonic() < deadline, "the finished run's Train controller is still alive"
        time.sleep(0.5)
    assert (tmp_path / "killed" / FAULT_MARKER).exists()
    assert summary["resumed_at"] == [{"epoch": 1, "step": 20}]
    assert (tmp_path / "killed" / "checkpoint_final_restart1").is_dir()
    a = load_file(Path(straight["outputs"]["model"]) / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert epochs_of(tmp_path / "killed") == [1, 2, 3, 4, 5, 6]


def test_a_diverged_run_stops_naming_the_step_and_exports_nothing(tiny_recipe, tmp_path, cli_on_test_ray):
    """SGD at lr 10 with momentum 0.99 and no clipping, under fp16 autocast: the activations
    overflow fp16 and the loss turns NaN within some 30 steps. The run stops with one line naming
    the step, exit code 1, and no model or summary is written."""
    tiny_recipe["train"].update(lr=10.0, optimizer="sgd", momentum=0.99, clip_grad_norm=None, precision="fp16")
    code, stderr = cli_on_test_ray("run", str(write_recipe(tiny_recipe, tmp_path / "tiny.yaml")))
    assert code == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: training diverged at step \d+ \(epoch \d\): the loss is (nan|inf|-inf); nothing was exported "
                        r"\(lower train.lr, or look at the data\)", last), stderr[-2000:]
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "summary.json").exists()


def epochs_of(run_dir: Path) -> list[int]:
    return [row["epoch"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in row]


def test_embedded_ray_workers_collect_garbage_less_often(local_ray):
    """Every worker process of the embedded Ray runs the set-up hook before its first task."""
    import gc

    import ray

    assert ray.get(ray.remote(lambda: gc.get_threshold()).remote()) == (10_000, 20, 20)


def test_a_train_controller_process_ends_before_rays_native_teardown(local_ray, tmp_path):
    """Ray's native teardown at exit can deadlock a Train controller (raytune_ft.worker_setup): a
    process titled ray::TrainController ends at exit before Ray's exit handler and that teardown
    run; any other actor's process exits through them as before. Both are gone once their
    handles are."""
    import ray

    class ExitWatcher:  # defined here, so that it travels by value to the actor's process
        """Leaves a file behind if Ray's own exit handler (ray.shutdown, which ends in the native
        teardown) runs in its process when it exits."""

        def __init__(self, marker: str):
            import ray._private.worker as ray_worker

            disconnect = ray_worker.disconnect

            def disconnect_and_mark(*args, **kwargs):
                Path(marker).touch()
                return disconnect(*args, **kwargs)

            ray_worker.disconnect = disconnect_and_mark

        def pid(self) -> int:
            return os.getpid()

    exits = {}
    for name in ("TrainController", "OtherActor"):
        actor = ray.remote(type(name, (ExitWatcher,), {}))  # Ray titles the process ray::<class name>
        handle = actor.remote(str(tmp_path / name))
        exits[name] = psutil.Process(ray.get(handle.pid.remote()))
        del handle
    _, alive = psutil.wait_procs(exits.values(), timeout=60)
    assert not alive
    assert not (tmp_path / "TrainController").exists() and (tmp_path / "OtherActor").exists()


@pytest.mark.slow
def test_real_minilm_smoke(local_ray, tmp_path):
    """The real MiniLM-L6 weights, the real drug reviews and the fortunes reference, a few steps
    through the real path."""
    from raytune_ft import load_recipe

    recipe = load_recipe("jobs/text_classification.yaml", [
        "train.max_steps=2", "train.epochs=null", "data.max_rows=64", "baseline.enabled=false",
        "train.early_stopping=null", "retention.references.0.data.max_rows=64", f"output.dir={tmp_path / 'minilm'}",
    ])
    summary = run(recipe)
    assert summary["steps"] == 2 and summary["test"]["count"] == 64
    assert 0 < summary["retention"]["retention"]["retention/topics/accuracy"]  # the real fortunes probe, scored
    assert (tmp_path / "minilm" / "model" / "model.safetensors").is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train has registered last (and would resume from), if any."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return None
    return run_dir / latest["checkpoint_dir_name"] if latest else None


def train_processes(processes: list[psutil.Process]) -> dict[str, list[psutil.Process]]:
    """The Ray Train workers and Train's controller among these processes."""
    found: dict[str, list[psutil.Process]] = {"RayTrainWorker": [], "TrainController": []}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            kind = next((kind for kind in found if kind in " ".join(process.cmdline())), None)
            if kind:
                found[kind].append(process)
    return found


def threads_niceness(processes: list[psutil.Process]) -> set[int]:
    """The niceness values of these processes' threads."""
    found: set[int] = set()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            found |= {os.getpriority(os.PRIO_PROCESS, thread.id) for thread in process.threads()}
    return found


def imported_torch(process: psutil.Process) -> bool:
    """Whether the process has loaded torch's library (imported torch)."""
    return "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()


VERBOSE_LINES = (  # what a -v run prints: the driver's debug lines and the workers' (Ray folds lines that
    # differ only in numbers, so the second worker's may show as a repeat)
    r"\[raytune-ft\] starting an embedded Ray with",
    r"\(RayTrainWorker pid=\d+\) \[raytune-ft\] worker [01] of 2: cpu, 1 torch threads, backend ddp",
    r"\(RayTrainWorker pid=\d+\) \[raytune-ft\] epoch 1 step \d+/\d+ loss",
)


def test_driver_killed_after_first_checkpoint_resumes_each_epoch_once(tiny_recipe, tmp_path, cli_in_process, local_ray):
    """SIGKILL the `raytune-ft run` process mid-epoch 2, with epoch 1's checkpoint on disk (a worker
    holds still there, so the kill cannot land after a later checkpoint); --resume then finishes.
    The interrupted epoch restarts from its beginning (the step count at epoch 1's end), so
    metrics.jsonl holds every epoch exactly once. Damaged copies of the killed run are refused.
    The killed run is also the verbose flag's case: -v reaches the Train workers (raytune_ft.log),
    which print their progress and their debug line through the driver; and the place where the
    live run's processes are looked at: their niceness, and torch loaded in the workers alone."""
    tiny_recipe["train"]["epochs"] = 3
    recipe_path = write_recipe(tiny_recipe, tmp_path / "tiny.yaml")
    run_dir = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "raytune_ft.cli", "-v", "run", str(recipe_path)], cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, FAULT_ENV: "stall_at_step:25"})  # 20 steps an epoch
    local_ray = []
    try:
        deadline = time.monotonic() + 500
        while not (run_dir / FAULT_MARKER).exists():
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.5)
        local_ray = psutil.Process(driver.pid).children(recursive=True)
        roles = train_processes(local_ray)
        niceness = {role: threads_niceness(processes) for role, processes in roles.items()}
        torch_in = {role: [imported_torch(process) for process in processes] for role, processes in roles.items()}
        # The workers' lines reach the driver through Ray's log monitor, a moment after they are written.
        output = ""
        while not all(re.search(line, output) for line in VERBOSE_LINES):
            assert time.monotonic() < deadline, output[-3000:]
            time.sleep(0.5)
            output = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "killed.log").read_text())  # Ray colours the workers' names
        driver.kill()
        driver.wait()
    finally:
        for process in local_ray:  # the killed driver's embedded Ray: nothing of it may outlive the test
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(local_ray, timeout=30)
    # Every thread of the training workers runs at the driver's niceness (root may raise a
    # priority); Train's controller runs its Python at Ray's 15 (Ray's own C++ threads are at 0).
    if os.geteuid() == 0:
        assert niceness["RayTrainWorker"] == {os.getpriority(os.PRIO_PROCESS, 0)}
    assert 15 in niceness["TrainController"]
    # The controller drives the process group's set-up, torch-free (raytune_ft/train/torch_config.py).
    assert torch_in == {"TrainController": [False], "RayTrainWorker": [True, True]}
    killed_at = latest_checkpoint(run_dir)
    assert killed_at.name == "checkpoint_epoch_0001" and not (run_dir / "summary.json").exists()

    # A damaged newest checkpoint is never resumed from: refused before Ray starts, nothing changed.
    for damage in ("truncated", "pickled"):
        copy = tmp_path / damage
        shutil.copytree(run_dir, copy)
        weights = copy / killed_at.name / "weights.safetensors"
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:-100])
        else:
            weights.write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
        before = snapshot(copy)
        code, stderr = cli_in_process("run", str(recipe_path), "--output", str(copy), "--resume")
        assert code == 2 and stderr.splitlines() == [stderr.strip()] and "Traceback" not in stderr, stderr
        assert stderr.startswith(f"error: --resume: {weights}: ") and "checkpoint to resume from is damaged" in stderr
        assert snapshot(copy) == before and not (tmp_path / "pwned").exists()

    run(validate_recipe(tiny_recipe), resume=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if "train/loss" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    # The workers' own log lines may not reach the driver before it exits; the summary records it.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_at"] == [{"epoch": 1, "step": epochs[0]["step"]}]


def test_the_next_epochs_batches_are_opened_ahead_and_closed_when_not_needed():
    """EpochBatches opens an epoch's iterator and fetches its first batch in a thread when asked
    ahead (while the previous epoch evaluates); the epoch then yields every batch in order. An
    epoch left part-way (max_steps) and one prepared but never run (early stopping) have their
    iterators closed, which ends Ray Data's prefetch threads."""
    import threading

    from raytune_ft.train.loop import EpochBatches

    opened, closed = [], []

    def open_epoch(epoch: int):
        opened.append((epoch, threading.current_thread().name))
        try:
            yield from ({"epoch": epoch, "index": index} for index in range(3))
        finally:
            closed.append(epoch)

    batches = EpochBatches(open_epoch)
    first = batches.epoch(1)
    assert opened == []  # opened at the first fetch, which the loop times as data wait
    assert [b["index"] for b in first] == [0, 1, 2] and closed == [1]
    batches.prepare(2)
    second = batches.epoch(2)
    assert next(second) == {"epoch": 2, "index": 0}
    epoch, thread = opened[1]
    assert epoch == 2 and thread.startswith("next-epoch-batches")
    second.close()  # left after one step
    assert closed == [1, 2]
    batches.prepare(3)  # early stopping then ends the run before epoch 3
    batches.close()
    assert closed == [1, 2, 3] and [epoch for epoch, _ in opened] == [1, 2, 3]
