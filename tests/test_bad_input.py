"""Bad data, model and output paths: a one-line error naming the field or file, exit code 2,
no traceback, and nothing already written lost. All caught before any Ray worker starts."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import cli, write_recipe


def rows(*pairs):
    return pa.Table.from_pylist([{"sentence": s, "sentiment": l} for s, l in pairs])


def case_missing_file(recipe, tmp_path):
    recipe["data"]["train"] = str(tmp_path / "nope.parquet")
    return "data.train: file not found", "nope.parquet"


def case_missing_column(recipe, tmp_path):
    recipe["data"]["columns"]["text"] = "review"
    return "data.columns.text: column 'review' not in", "columns: sentence, sentiment"


def case_label_not_in_set(recipe, tmp_path):
    recipe["data"]["labels"] = ["negative", "positive"]
    path = tmp_path / "odd.parquet"
    pq.write_table(rows(("fine", "positive"), ("meh", "neutral")), path)
    recipe["data"]["test"] = str(path)
    return "data.test: row 1: label 'neutral' is not in the label set", "data.labels"


def case_empty(recipe, tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(rows(("x", "positive")).slice(0, 0), path)
    recipe["data"]["train"] = str(path)
    return "data.train:", "has no rows"


def case_unreadable(recipe, tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    recipe["data"]["train"] = str(path)
    return "broken.parquet: cannot read as parquet", ""


def case_one_label(recipe, tmp_path):
    path = tmp_path / "one.parquet"
    pq.write_table(rows(("good", "positive"), ("great", "positive")), path)
    recipe["data"]["train"] = str(path)
    return "data.columns.label:", "fewer than 2 distinct labels"


def case_model_not_a_directory(recipe, tmp_path):
    (tmp_path / "empty_model").mkdir()
    recipe["model"]["path"] = str(tmp_path / "empty_model")
    return "model.path:", "is not a usable model directory"


def case_unknown_asset(recipe, tmp_path):
    recipe["model"]["path"] = "asset:gpt-17"
    return "model.path: unknown asset 'gpt-17'", "available:"


def case_max_length_too_long(recipe, tmp_path):
    recipe["task"]["max_length"] = 4096
    return "task.max_length: 4096 exceeds the model's 128 positions", ""


CASES = [case_missing_file, case_missing_column, case_label_not_in_set, case_empty, case_unreadable,
         case_one_label, case_model_not_a_directory, case_unknown_asset, case_max_length_too_long]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_line(case, tiny_recipe, tmp_path):
    first, second = case(tiny_recipe, tmp_path)
    result = cli("run", str(write_recipe(tiny_recipe, tmp_path / "r.yaml")))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert first in lines[0] and second in lines[0], lines[0]


def test_existing_run_is_never_overwritten(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"precious": true}')
    result = cli("run", str(write_recipe(tiny_recipe, tmp_path / "r.yaml")))
    assert result.returncode == 2
    assert "already holds a run; pass --resume to continue it or --force" in result.stderr
    assert (run_dir / "summary.json").read_text() == '{"precious": true}'


def test_resume_without_a_run_is_an_error(tiny_recipe, tmp_path):
    result = cli("run", str(write_recipe(tiny_recipe, tmp_path / "r.yaml")), "--resume")
    assert result.returncode == 2 and "--resume: no run to resume in" in result.stderr


def test_output_dir_that_cannot_be_created(tiny_recipe, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    tiny_recipe["output"]["dir"] = str(tmp_path / "a_file" / "run")
    result = cli("run", str(write_recipe(tiny_recipe, tmp_path / "r.yaml")))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "output.dir:" in result.stderr and "is not writable" in result.stderr
    assert (tmp_path / "a_file").read_text() == "not a directory"
