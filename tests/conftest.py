"""Shared fixtures: a tiny BERT and a tiny EfficientNet built from configs, a small learnable text data set, local Ray."""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAYTUNE_FT_CACHE", str(ROOT / ".cache" / "raytune_ft"))

POSITIVE = ["great", "excellent", "wonderful", "helpful", "amazing", "effective"]
NEGATIVE = ["awful", "terrible", "useless", "horrible", "painful", "dreadful"]
FILLER = ["the", "drug", "was", "really", "for", "me", "and", "my", "doctor", "said", "it", "felt", "quite"]


def sentiment_rows(count: int, seed: int) -> list[dict]:
    """Short texts whose label is carried by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["positive", "negative"])
        words = rng.choices(FILLER, k=6) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": label})
    return rows


TOPICS = {
    "sport": ["football", "goal", "match", "team", "coach", "league"],
    "food": ["bread", "soup", "cheese", "recipe", "dinner", "spice"],
    "code": ["compiler", "python", "function", "server", "bug", "database"],
}


def topic_rows(count: int, seed: int) -> list[dict]:
    """A reference task unlike the target: the topic of a text, carried by two topic words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        topic = rng.choice(sorted(TOPICS))
        words = rng.choices(FILLER, k=4) + rng.choices(TOPICS[topic], k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "topic": topic})
    return rows


TINY_EFFICIENTNET = {
    "architecture": "efficientnet_lite", "stem_channels": 8,
    "stages": [[3, 1, 1, 8, 1], [3, 2, 4, 16, 1], [5, 2, 4, 24, 2]],
    "head_channels": 32, "dropout": 0.0, "num_labels": 10,
}


@pytest.fixture(scope="session")
def tiny_efficientnet(tmp_path_factory) -> Path:
    """A 3-stage, 8-32 channel EfficientNet-Lite with random weights, saved like an export."""
    import torch

    from raytune_ft.models.efficientnet_lite import EfficientNetLite
    from raytune_ft.tasks.image_classification import save_model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_efficientnet")
    save_model(EfficientNetLite(TINY_EFFICIENTNET), directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer, saved like any pretrained model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from raytune_ft.data import assets

    directory = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(assets.minilm_l6()).save_pretrained(directory)
    return directory


def write_splits(directory: Path, make_rows, splits: tuple[tuple[str, int, int], ...]) -> dict[str, Path]:
    """One parquet file per (split, row count, seed) of ``make_rows(count, seed)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    for split, count, seed in splits:
        paths[split] = directory / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(make_rows(count, seed)), paths[split])
    return paths


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory) -> dict[str, Path]:
    return write_splits(tmp_path_factory.mktemp("sentiment"), sentiment_rows, (("train", 400, 1), ("test", 96, 2)))


@pytest.fixture(scope="session")
def topic_data(tmp_path_factory) -> dict[str, Path]:
    return write_splits(tmp_path_factory.mktemp("topics"), topic_rows, (("train", 240, 3), ("test", 120, 4)))


def with_topic_reference(recipe: dict, topic_data: dict[str, Path]) -> dict:
    """``recipe`` with a probe reference on the topic data."""
    recipe["retention"] = {"references": [{
        "name": "topics", "data": {"train": str(topic_data["train"]), "test": str(topic_data["test"]),
                                   "columns": {"text": "text", "label": "topic"}},
    }]}
    return recipe


@pytest.fixture
def retention_recipe(tiny_recipe, topic_data) -> dict:
    """The tiny recipe with a probe reference on the topic data, 3 epochs."""
    tiny_recipe["train"]["epochs"] = 3
    return with_topic_reference(tiny_recipe, topic_data)


def tiny_recipe_dict(tiny_bert: Path, sentiment_data: dict[str, Path], run_dir: Path) -> dict:
    """A raw recipe dict for a fast 2-worker run; tests adjust it and write it where they need."""
    return {
        "name": "tiny",
        "task": {"type": "text_classification", "max_length": 32},
        "model": {"path": str(tiny_bert)},
        "data": {"train": str(sentiment_data["train"]), "test": str(sentiment_data["test"]),
                 "columns": {"text": "sentence", "label": "sentiment"}, "validation_fraction": 0.2},
        "train": {"lr": 3e-3, "epochs": 6, "batch_size": 8, "schedule": "constant", "dropout": 0.0, "seed": 7, "log_every": 10},
        "scaling": {"workers": 2},
        "baseline": {"enabled": False},
        "output": {"dir": str(run_dir)},
    }


@pytest.fixture
def tiny_recipe(tiny_bert, sentiment_data, tmp_path) -> dict:
    return tiny_recipe_dict(tiny_bert, sentiment_data, tmp_path / "run")


def unit_recipe(task: dict, model: str | Path | dict, **sections):
    """A typed recipe for building a task or strategy directly (no data is read): the task's and
    the strategy's options validated by their owners, ``sections`` as in a recipe file."""
    from raytune_ft.schema import Recipe
    from raytune_ft.strategies import STRATEGIES
    from raytune_ft.tasks import TASKS

    strategy = sections.pop("strategy", {"method": "full"})
    model = model if isinstance(model, dict) else {"path": str(model)}
    return Recipe(name="unit", task=TASKS[task["type"]].Options(**task), model=model, data={"train": "unused", **sections.pop("data", {})},
                  strategy=STRATEGIES[strategy["method"]].Options(**strategy), **sections)


def strategy_of(spec: dict):
    """The strategy of a recipe's ``strategy:`` section."""
    from raytune_ft.strategies import STRATEGIES

    return STRATEGIES[spec["method"]](STRATEGIES[spec["method"]].Options(**spec))


def write_recipe(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``raytune-ft`` command line, in the environment of a user's shell: without the
    RAY_AUTH_MODE that an in-process ``ray.init`` sets here and never unsets."""
    base = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    return subprocess.run(
        [sys.executable, "-m", "raytune_ft.cli", *args], capture_output=True, text=True, timeout=timeout,
        env={**base, **(env or {})}, cwd=ROOT,
    )


def command_line_here(monkeypatch, capsys, *, reaches_ray: bool):
    """``raytune-ft ARGS`` run by its ``main`` in this process: returns (exit code, stderr)."""
    from raytune_ft.cli import main

    def no_ray(*_, **__):
        raise AssertionError("this case reached Ray; it should fail before")

    def run(*args: str) -> tuple[int, str]:
        with monkeypatch.context() as patched:
            if not reaches_ray:
                patched.setattr("raytune_ft.train.runner.init_ray", no_ray)
                patched.setattr("raytune_ft.train.ray_start.init_ray", no_ray)
            patched.setattr(sys, "argv", ["raytune-ft", *args])
            capsys.readouterr()
            with pytest.raises(SystemExit) as exited:
                main()
        if reaches_ray:
            import ray

            if not ray.is_initialized():  # a failed run shuts Ray down to flush its workers' logs
                start_test_ray()
        return exited.value.code, capsys.readouterr().err

    return run


@pytest.fixture
def cli_in_process(monkeypatch, capsys):
    """``raytune-ft ARGS`` in this process, for cases that must fail before Ray starts (starting
    it is an AssertionError): returns (exit code, stderr)."""
    return command_line_here(monkeypatch, capsys, reaches_ray=False)


@pytest.fixture
def cli_on_test_ray(monkeypatch, capsys, local_ray):
    """``raytune-ft ARGS`` in this process, on this file's running Ray (the command line's own
    code path, without a process and a Ray of its own; a Ray it shut down is started again):
    returns (exit code, stderr)."""
    return command_line_here(monkeypatch, capsys, reaches_ray=True)


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root``: its mtime and bytes, to show nothing was created, changed or lost."""
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


class Payload:
    """A malicious pickle: unpickling it creates ``marker`` (stands for any code it could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def start_test_ray() -> None:
    """The embedded local Ray of the in-process integration tests: 4 logical CPUs, quiet."""
    from raytune_ft.train.ray_start import QUIET_RAY, start_local_ray

    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    start_local_ray(num_cpus=4, logging_level="WARNING")


@pytest.fixture(scope="session")
def local_ray():
    """The embedded local Ray of this test process's in-process integration tests, started by the
    first test that needs it: one Ray for every file a test process runs (a fresh Ray per file
    cost each file ~30 CPU-s of start-up, and its workers' imports again)."""
    import ray

    start_test_ray()
    yield
    ray.shutdown()


# Rarely, on two overloaded cores, a driver that has run many Train runs never hears that an actor
# it created is alive (the GCS logs it created; the notification never arrives), and the run waits
# for ever in ray.get. Ray's blocking calls give way to SystemExit alone, so a test that runs past
# the limit gets one: it fails with its threads' stacks on stderr, this process starts a fresh Ray,
# and --reruns runs the test once more there. A fixture's run is retried by run_in_fixture instead
# (pytest cannot set up a module or session fixture again once it failed). The thread timeout in
# pyproject.toml is the backstop for a block no signal reaches.
HANG_LIMIT_S = int(os.environ.get("RAYTUNE_FT_TEST_HANG_LIMIT_S", "420"))
# .ci/run's watchdog: each test process names its current test in the file <pid> of this
# directory, and SIGUSR1 writes its threads' stacks to <pid>.stacks (not to stderr, which pytest
# captures), so a suite that outlives CI's limit says where it was.
WATCH_DIR = os.environ.get("RAYTUNE_FT_TEST_WATCH")
if WATCH_DIR:
    _stacks = open(Path(WATCH_DIR) / f"{os.getpid()}.stacks", "w")  # open for as long as the process lives
    faulthandler.register(signal.SIGUSR1, file=_stacks, all_threads=True)
_interrupted = {"ray_unusable": False}


class RanPastLimit(SystemExit):
    """Interrupts a test (setup, call or teardown) that ran past HANG_LIMIT_S."""


def fresh_ray_after_hang() -> bool:
    """After an interrupted hang: replace this process's Ray (if it has one); False if none hung."""
    import ray

    if not _interrupted["ray_unusable"]:
        return False
    _interrupted["ray_unusable"] = False
    if ray.is_initialized():
        ray.shutdown()
        start_test_ray()
    return True


def run_in_fixture(start):
    """``start(force)``, a fixture's run; once more (force=True: over the partial output) on a
    fresh Ray if the hang guard interrupted it."""
    try:
        return start(False)
    except SystemExit:
        if not fresh_ray_after_hang():
            raise
        print("run_in_fixture: the interrupted run starts again on a fresh Ray", file=sys.stderr)
        signal.alarm(HANG_LIMIT_S)
        return start(True)


# Test files, costliest first (seconds of test time in one `make test`, 2026-12-05: jobs 481, tune
# 422, DeepSpeed 246, training 196, retention 190, multitask 132, then each under 100). `make test`
# runs with `--no-loadscope-reorder`, so xdist hands the files out in this order and the two test
# processes end together; by its default order (most tests first) the 196 s training file came
# last, and one process ran it alone for 100 s while the other had finished. Files not named here
# follow in collection order.
COSTLIEST_FILES_FIRST = [
    "test_jobs.py", "test_tune.py", "test_zero3_features.py", "test_deepspeed.py", "test_training.py", "test_floor.py", "test_retention.py", "test_multitask.py",
    "test_precision.py",
    "test_compression.py", "test_fusion.py", "test_image.py", "test_speech.py", "test_causal_lm.py", "test_vqa.py",
    "test_distill.py", "test_explain.py",
]


# Fixtures that start Ray or a real run: a test that uses one (directly or through another
# fixture) is marked `ray`, the slow tier. `make test-fast` runs the rest and the one `e2e` test.
RAY_FIXTURES = {"local_ray", "token_head", "finished_text_run", "s3_server"}


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(COSTLIEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)


def hang_limit(item) -> int:
    """HANG_LIMIT_S, or a minute less than a longer pytest-timeout the test declares (one that
    trains several runs, e.g. the floor's search): interrupted before pytest-timeout kills it."""
    marker = item.get_closest_marker("timeout")
    return max(HANG_LIMIT_S, int(marker.args[0]) - 60) if marker and marker.args else HANG_LIMIT_S


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    limit = hang_limit(item)

    def interrupt(signum, frame):
        _interrupted["ray_unusable"] = True
        print(f"\n{item.nodeid} ran past {limit} s; interrupting it. Its threads:", file=sys.stderr)
        faulthandler.dump_traceback(sys.stderr)
        signal.alarm(60)  # a cleanup that blocks in turn is interrupted as well
        raise RanPastLimit(f"{item.nodeid} ran past {limit} s")

    signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(limit)
    if WATCH_DIR:
        (Path(WATCH_DIR) / str(os.getpid())).write_text(f"{item.nodeid} (since {time.strftime('%H:%M:%S')})")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield
    signal.alarm(0)
    fresh_ray_after_hang()


@pytest.fixture(scope="session")
def finished_text_run(tiny_bert, sentiment_data, tmp_path_factory, worker_id) -> Path:
    """A finished tiny text run (1 worker, 3 epochs, its model exported, tracked to TensorBoard and
    MLflow), made once per session by the real CLI, and under xdist once for all test processes (a
    file lock in the base directory they share: each process building its own cost a CLI run,
    about a minute on two loaded cores). What the command printed is beside it, in
    ``cli_output.txt``.
    Tests that write into a run directory work on ``copy_run(finished_text_run, tmp_path)``."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    run_dir = shared / "finished_text_run" / "run"
    with FileLock(shared / "finished_text_run.lock"):
        if not (run_dir / "summary.json").is_file():
            run_dir.parent.mkdir(exist_ok=True)
            recipe = tiny_recipe_dict(tiny_bert, sentiment_data, run_dir)
            recipe["train"]["epochs"] = 3
            recipe["scaling"]["workers"] = 1
            recipe["output"].update(tensorboard=True, mlflow=True)  # test_tracking reads them back
            path = write_recipe(recipe, run_dir.parent / "recipe.yaml")
            result = run_in_fixture(lambda force: cli("run", str(path), *(["--force"] if force else [])))
            assert result.returncode == 0, result.stderr[-3000:]
            (run_dir.parent / "cli_output.txt").write_text(result.stdout + result.stderr)
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of a finished run directory (model, recipe, summary, metrics)."""
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name, ignore=shutil.ignore_patterns("checkpoint_*")))
