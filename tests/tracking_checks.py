"""Reading a run's tracking back: MLflow's client and TensorBoard's own event reader, compared
with the run's metrics.jsonl (shared by test_tracking.py and test_tune.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2


def metric_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def logged_hparams(accumulator: EventAccumulator) -> dict:
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


def assert_same_as_metrics_jsonl(run_dir: Path, client: MlflowClient, run_id: str, tensorboard: Path) -> None:
    """Every number of every metrics.jsonl record, at the record's step, in MLflow (exactly) and
    TensorBoard (to float32); logged while training ran, before the run wrote its summary."""
    records = metric_records(run_dir)
    finished = (run_dir / "summary.json").stat().st_mtime
    accumulator = events(tensorboard)
    names = {key for record in records for key in record if key != "step"}
    assert {"train/loss", "eval/accuracy", "test/accuracy", "epoch"} <= names
    for name in names:
        expected = [(record["step"], record[name]) for record in records if name in record]
        history = client.get_metric_history(run_id, name)
        assert [(m.step, m.value) for m in history] == expected, name
        scalars = accumulator.Scalars(name)
        assert [s.step for s in scalars] == [step for step, _ in expected], name
        assert [s.value for s in scalars] == pytest.approx([value for _, value in expected], rel=1e-6), name
        if name.startswith("eval/"):  # live: each epoch arrived while the run was still training
            assert max(m.timestamp for m in history) / 1000 < finished and max(s.wall_time for s in scalars) < finished
