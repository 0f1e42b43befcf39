"""Fail fast, fail clearly, move nothing (issue 43): the four ways a bad input went wrong (a hang, a
traceback, silent acceptance, the user's files moved), each answered by the real command line in
seconds with exit code 2 and one line, nothing outside the run folder changed; and the rules behind
them, unit by unit: resources against Ray, the run folder, bad cells.

The command runs in-process (``raytune_ft.cli.main``) through every check ``run`` makes; only the
embedded Ray's own start is replaced, by an AssertionError: a case that reaches it failed too late.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import sentiment_rows, snapshot, write_recipe
from raytune_ft.errors import UserError
from raytune_ft.schema import set_field
from raytune_ft.train import resources

# Seconds a case may take on two shared, loaded cores (the checks take about one; a hang, for ever).
FAST_S = 60


@pytest.fixture
def cli_before_ray(monkeypatch, capsys):
    """``raytune-ft ARGS`` in this process, up to the embedded Ray's start: (exit code, stderr, seconds)."""
    import ray

    from raytune_ft.cli import main

    def started(*_, **__):
        raise AssertionError("the embedded Ray started: this case should have failed before")

    def run(*args: str) -> tuple[int, str, float]:
        with monkeypatch.context() as patched:
            patched.setattr("raytune_ft.train.ray_start.start_local_ray", started)
            patched.setattr(ray, "is_initialized", lambda: False)  # this process's test Ray, if any, is not the user's
            patched.setattr(sys, "argv", ["raytune-ft", *args])
            capsys.readouterr()
            began = time.perf_counter()
            with pytest.raises(SystemExit) as exited:
                main()
        return exited.value.code, capsys.readouterr().err, time.perf_counter() - began

    return run


def vqa(recipe: dict) -> dict:
    """The tiny recipe as visual question answering (its sentences stand in for both inputs)."""
    recipe["task"] = {"type": "visual_question_answering", "image_encoder": "asset:efficientnet-lite0"}
    recipe["data"]["columns"] = {"image": "sentence", "question": "sentence", "label": "sentiment"}
    return recipe


def one_row_validation(recipe: dict, tmp_path: Path) -> dict:
    path = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist(sentiment_rows(1, 3)), path)
    recipe["data"]["validation"] = str(path)
    recipe["train"]["early_stopping"] = {"metric": "eval/accuracy", "mode": "max"}
    return recipe


# (class, command, changes to the tiny recipe (dotted path: value, or a function of recipe and
# tmp_path), what the one line says). The classes are the issue's: each case once hung, printed a
# traceback, was accepted, or moved the user's files.
CASES = {
    "gpu_on_a_machine_without_one": ("hang", "run", {"scaling.use_gpu": True}, "scaling.use_gpu: true, but"),
    "more_workers_than_cores": ("hang", "run", {"scaling.workers": 10_000}, "scaling.workers: 10000 workers x 1 CPU need 10000 CPU"),
    "tune_trials_times_workers_beyond_cores": ("hang", "tune", {"tune": {"space": {"train.lr": {"choice": [1e-3, 3e-3]}},
                                                                         "max_concurrent_trials": 100, "workers_per_trial": 100}},
                                               "tune.max_concurrent_trials: 100 trials at once x 100 workers x 1 CPU need 10000 CPU"),
    "resource_no_node_offers": ("silent", "run", {"scaling.resources_per_worker": {"CPU_typo": 1}},
                                "scaling.resources_per_worker.CPU_typo:", "offers no resource 'CPU_typo'"),
    "infinite_warmup": ("traceback", "validate", {"train.warmup": float("inf")}, "train.warmup: Input should be a finite number (got inf)"),
    "nan_learning_rate": ("traceback", "validate", {"train.lr": float("nan")}, "train.lr: Input should be a finite number (got nan)"),
    "seed_beyond_numpy": ("traceback", "validate", {"train.seed": 2**40}, "train.seed: Input should be less than or equal to 4294967295"),
    "baseline_value_its_run_refuses": ("traceback", "validate", {"baseline.enabled": True, "baseline.lr": 20},
                                       "baseline.lr: Input should be less than or equal to 10"),
    "negative_retry_count": ("silent", "validate", {"train.max_failures": -1}, "train.max_failures: Input should be greater than or equal to 0"),
    "negative_resource": ("silent", "validate", {"scaling.resources_per_worker": {"CPU": -1}},
                          "scaling.resources_per_worker.CPU: Input should be greater than or equal to 0"),
    "missing_train_file": ("silent", "validate", {"data.train": "/nonexistent/train.parquet"}, "data.train: file not found"),
    "missing_train_file_vqa": ("silent", "validate", lambda recipe, _: set_field(vqa(recipe), "data.train", "/nonexistent/train.parquet"),
                               "data.train: file not found"),
    "vqa_question_beyond_positions": ("silent", "validate", lambda recipe, _: set_field(vqa(recipe), "task.max_length", 256),
                                      "task.max_length: 256 exceeds the model's 128 positions"),
    "one_row_validation_for_early_stopping": ("silent", "validate", one_row_validation,
                                              "data.validation:", "has 1 row, but train.early_stopping.metric decides on them, which needs at least 20"),
    "output_is_the_working_folder": ("moved", "run --force", {"output.dir": "."}, "output.dir:", "is the working folder"),
    "output_above_the_working_folder": ("moved", "run --force", {"output.dir": ".."}, "is a folder above the working folder"),
    "output_holds_the_data": ("moved", "run --force", {"output.dir": "data"}, "output.dir:", "holds data.train"),
}


@pytest.mark.parametrize("name", CASES)
def test_each_class_of_bad_input_is_one_line_in_seconds_and_moves_nothing(name, tiny_recipe, tmp_path, monkeypatch, cli_before_ray):
    kind, command, change, *expected = CASES[name]
    if name == "gpu_on_a_machine_without_one" and resources.machine_supply().total.get("GPU"):
        pytest.skip("this machine has a GPU")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    monkeypatch.chdir(work)  # the user's working folder: the recipe and a copy of the data
    data = work / "data" / "train.parquet"
    data.write_bytes(Path(tiny_recipe["data"]["train"]).read_bytes())
    tiny_recipe["data"]["train"] = str(data)
    tiny_recipe["output"]["dir"] = str(work / "runs" / "tiny")
    if callable(change):
        change(tiny_recipe, tmp_path)
    else:
        for path, value in change.items():
            set_field(tiny_recipe, path, value)
    recipe = write_recipe(tiny_recipe, work / "recipe.yaml")
    before = snapshot(tmp_path)
    code, stderr, seconds = cli_before_ray(*command.split()[:1], str(recipe), *command.split()[1:])
    lines = stderr.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert all(part in lines[0] for part in expected), lines[0]
    assert seconds < FAST_S, f"{kind}: {seconds:.0f} s"
    assert snapshot(tmp_path) == before  # nothing created, changed, moved or deleted


def test_cases_cover_the_four_classes():
    assert {case[0] for case in CASES.values()} == {"hang", "traceback", "silent", "moved"}


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from raytune_ft.cli import main

    def broken(*_, **__):
        raise KeyError("internal")

    monkeypatch.setattr("raytune_ft.cli._load", broken)
    monkeypatch.setattr(sys, "argv", ["raytune-ft", "validate", "jobs/text_classification.yaml"])
    with pytest.raises(SystemExit) as exited:
        main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 1 and "Traceback" in stderr and "KeyError: 'internal'" in stderr
    assert stderr.splitlines()[-1].startswith("error: this is a bug in raytune-ft") and "please report it" in stderr


def test_validate_names_the_uris_it_does_not_read(tiny_recipe, tmp_path, monkeypatch, capsys):
    from raytune_ft.cli import main

    tiny_recipe["data"]["test"] = "s3://bucket/reviews/test.parquet"
    monkeypatch.setattr(sys, "argv", ["raytune-ft", "validate", str(write_recipe(tiny_recipe, tmp_path / "r.yaml"))])
    main()  # no SystemExit: it passes
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok: ") and out[1:] == [
        "not checked: data.test s3://bucket/reviews/test.parquet (a URI: the run reads it where it runs; validate does not)"]


# Resources: a demand against a supply, no Ray needed.
def demand(workers: int = 2, **resources_per_worker) -> resources.Demand:
    from raytune_ft.recipe import validate_recipe

    base = {"name": "r", "task": {"type": "text_classification"}, "model": {"path": "m"},
            "data": {"train": "t", "columns": {"text": "a", "label": "b"}}, "scaling": {"workers": workers}}
    if resources_per_worker:
        base["scaling"]["resources_per_worker"] = resources_per_worker
    return resources.run_demand(validate_recipe(base))


MACHINE = resources.Supply("this machine", {"CPU": 2.0, "memory": 8 * 2**30}, {"CPU": 2.0, "memory": 8 * 2**30})
TWO_NODES = resources.Supply("the cluster", {"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}, nodes=2)


@pytest.mark.parametrize("need, supply, expected", [
    (demand(2), MACHINE, None),
    (demand(3), MACHINE, "scaling.workers: 3 workers x 1 CPU need 3 CPU, but this machine has 2 CPU"),
    (demand(1, CPU=1, GPU=1), MACHINE, "scaling.resources_per_worker.GPU: this machine offers no resource 'GPU'; it offers CPU, memory"),
    (demand(1, CPU=0.5, CPU_typo=1), MACHINE, "scaling.resources_per_worker.CPU_typo: this machine offers no resource 'CPU_typo'"),
    (demand(1, CPU=1, memory=16 * 2**30), MACHINE, "need 16.0 GiB of memory, but this machine has 8.0 GiB of memory"),
    (demand(2, CPU=4, GPU=1), TWO_NODES, None),
    (demand(1, CPU=6), TWO_NODES, "scaling.resources_per_worker.CPU: 6 CPU per worker, but a worker runs on one node, "
                                  "and the largest node of the cluster has 4 CPU"),
    (demand(3, CPU=1, GPU=1), TWO_NODES, "scaling.workers: 3 workers x 1 GPU need 3 GPU, but the cluster has 2 GPU"),
    # An autoscaling cluster that says how far it grows; one that does not is waited for.
    (demand(4), resources.Supply("the cluster", {"CPU": 1.0}, {"CPU": 1.0}, grows=True, limits={"CPU": 8.0}), None),
    (demand(9), resources.Supply("the cluster", {"CPU": 1.0}, {"CPU": 1.0}, grows=True, limits={"CPU": 8.0}),
     "scaling.workers: 9 workers x 1 CPU need 9 CPU, but the cluster can grow to 8 CPU"),
    (demand(9, CPU=1, TPU=1), resources.Supply("the cluster", {}, {}, grows=True), None),
])
def test_a_demand_that_can_never_fit_is_named(need, supply, expected):
    error = resources.impossible(need, supply)
    assert error is None if expected is None else error is not None and expected in str(error), error


def test_use_gpu_without_a_gpu_names_use_gpu():
    from raytune_ft.recipe import validate_recipe

    recipe = validate_recipe({"name": "r", "task": {"type": "text_classification"}, "model": {"path": "m"},
                              "data": {"train": "t", "columns": {"text": "a", "label": "b"}}, "scaling": {"use_gpu": True}})
    error = resources.impossible(resources.run_demand(recipe), MACHINE)
    assert str(error) == "scaling.use_gpu: true, but this machine has no GPU; set it to false, or run where there is one (--address)"


def test_waiting_for_an_autoscaler_reports_and_ends(capsys):
    """The wait asks for the nodes, reports how long it has waited, ends when they come, gives up
    after max_wait_s (one line naming scaling.max_wait_s), and withdraws its request either way."""
    requests = []
    small = resources.Supply("the cluster", {"CPU": 1.0}, {"CPU": 1.0}, grows=True)
    grown = resources.Supply("the cluster", {"CPU": 4.0}, {"CPU": 1.0}, nodes=4, grows=True)
    supplies = iter([small, small, grown])
    resources.wait_for_growth(demand(4), lambda: next(supplies), requests.append, max_wait_s=60, poll_s=0.01)
    assert requests == [[{"CPU": 1.0}] * 4, []]
    assert "waiting for the autoscaler to add nodes: need 4 CPU (it has 1 CPU); waited 0 s (gives up after scaling.max_wait_s = 60 s)" \
        in capsys.readouterr().out
    requests.clear()
    started = time.monotonic()
    with pytest.raises(UserError, match=r"^scaling.max_wait_s: the cluster did not grow to 4 CPU \(it has 1 CPU\) in 0 s; raise scaling.max_wait_s"):
        resources.wait_for_growth(demand(4), lambda: small, requests.append, max_wait_s=0.2, poll_s=0.05)
    assert time.monotonic() - started < 5 and requests[-1] == []


# The run folder.
def test_a_run_folder_is_never_the_users_own(tmp_path, monkeypatch):
    from raytune_ft.run_folder import check_own_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for folder, expected in ((tmp_path, "is the working folder"), (tmp_path.parent, "is a folder above the working folder"),
                             (tmp_path / "data", "holds data.train")):
        with pytest.raises(UserError, match=expected):
            check_own_folder(folder, [("data.train", tmp_path / "data" / "train.parquet")])
    check_own_folder(tmp_path / "runs" / "x", [("data.train", tmp_path / "data" / "train.parquet")])


# Bad cells.
def test_bad_cells_are_bad_rows(tmp_path):
    from raytune_ft.data import tabular
    from raytune_ft.schema import DataSection

    rows = sentiment_rows(6, 1)
    rows[2]["sentence"], rows[4]["sentence"] = "  ", 17
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{**row, "sentence": row["sentence"] if row["sentence"] != 17 else "x"} for row in rows]), path)
    batch = {"text": np.array([row["sentence"] for row in rows], dtype=object), "label": np.array([0, 1, 0, 1, -1, 0])}
    split = tabular.Split("train", str(path), "parquet", field="data.train", rows=6)
    skip = DataSection(train=str(path), columns={"text": "sentence", "label": "sentiment"}, on_bad_rows="skip")
    kept = tabular.DropBadRows(split, skip, ("label",))(dict(batch))
    assert list(kept["text"]) == [rows[i]["sentence"] for i in (0, 1, 3, 5)]
    fail = skip.model_copy(update={"on_bad_rows": "fail"})
    with pytest.raises(UserError, match=r"^data.train: .*train.parquet: row 2: column 'sentence' \(text\) is empty; fix it, or set "
                                        r"data.on_bad_rows: skip"):
        tabular.DropBadRows(split, fail, ("label",))(dict(batch))
    assert [tabular.cell_problem(value, "text") for value in (None, float("nan"), "", 3, "ok")] == \
        ["null", "null", "empty", "not text (a int)", None]


def test_resume_with_other_data_is_refused(tiny_recipe, tmp_path, cli_in_process):
    run_dir = Path(tiny_recipe["output"]["dir"])
    run_dir.mkdir()
    write_recipe(tiny_recipe, run_dir / "recipe.yaml")  # the interrupted run's record
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(sentiment_rows(400, 9)), other)
    tiny_recipe["data"]["train"] = str(other)
    code, stderr = cli_in_process("run", str(write_recipe(tiny_recipe, tmp_path / "r.yaml")), "--resume")
    assert code == 2 and "data.train" in stderr, stderr
