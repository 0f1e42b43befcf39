"""Shared storage is the source of truth: a run on ``output.storage_path`` resumes from storage
alone once its local folder (the head's disk) is gone, on a shared folder and on a real
S3-compatible server (moto's, on 127.0.0.1, started and stopped here); a resume refuses a recipe
that changed what the checkpoint was made from and records what it accepted."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, write_recipe
from raytune_ft import run
from raytune_ft.errors import UserError
from raytune_ft.recipe import validate_recipe


def epochs_recorded(run_dir: Path) -> list[int]:
    return [row["epoch"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in row]


def test_a_run_on_a_shared_folder_resumes_from_storage_alone(tiny_recipe, tmp_path, local_ray):
    """A 1-epoch run, its local folder deleted, then --resume with train.epochs=2: the run goes on
    from the checkpoint in storage and records epoch 2; the change is recorded, and a change to
    what the checkpoint was made from is refused, naming the field."""
    tiny_recipe["train"]["epochs"] = 1
    tiny_recipe["output"]["storage_path"] = str(tmp_path / "shared")
    first = run(validate_recipe(tiny_recipe))
    assert first["epochs"] == 1
    shutil.rmtree(tmp_path / "run")  # the head and its disk are gone

    changed_data = {**tiny_recipe, "train": {**tiny_recipe["train"], "epochs": 2}, "data": {**tiny_recipe["data"], "validation_fraction": 0.3}}
    with pytest.raises(UserError, match=r"--resume: the checkpoint was made with another data.validation_fraction"):
        run(validate_recipe(changed_data), resume=True)

    tiny_recipe["train"]["epochs"] = 2
    resumed = run(validate_recipe(tiny_recipe), resume=True)
    assert resumed["epochs"] == 2 and epochs_recorded(tmp_path / "run") == [1, 2]
    assert resumed["resumes"][-1]["changes"] == [{"field": "train.epochs", "before": 1, "after": 2}]
    stored = json.loads((tmp_path / "shared" / "run" / "summary.json").read_text())
    assert stored["epochs"] == 2  # published back to storage
    assert (tmp_path / "run" / "recipe.yaml").read_text() == (tmp_path / "shared" / "run" / "recipe.yaml").read_text()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3 server on 127.0.0.1 with one bucket: (storage URI prefix, environment for clients)."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto's S3 server did not start"
                time.sleep(0.2)
        from pyarrow import fs

        fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing", secret_key="testing",
                        region="us-east-1", allow_bucket_creation=True).create_dir("runs")
        yield f"s3://runs/raytune?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", env
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_run_on_s3_resumes_from_storage_alone(tiny_recipe, tmp_path, s3_server):
    """The same on a real S3 protocol server, through the command line (a fresh embedded Ray each
    time, the head's disk gone in between): storage alone carries the run. The first run is also
    the quiet flag's case: -q silences every progress line, the Train workers' included (the
    driver's level reaches them through raytune_ft.log), and leaves the results."""
    uri, env = s3_server
    tiny_recipe["train"]["epochs"] = 1
    tiny_recipe["output"]["storage_path"] = uri
    recipe_path = write_recipe(tiny_recipe, tmp_path / "tiny.yaml")
    first = cli("-q", "run", str(recipe_path), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"^test accuracy +\S+ +[\d.]+", first.stdout, re.MULTILINE), first.stdout[-2000:]
    assert "[raytune-ft]" not in first.stdout + first.stderr
    shutil.rmtree(tmp_path / "run")
    resumed = cli("run", str(recipe_path), "--resume", "--set", "train.epochs=2", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert epochs_recorded(tmp_path / "run") == [1, 2]
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    s3 = fs.S3FileSystem(endpoint_override=uri.split("endpoint_override=")[1].split("&")[0], scheme="http",
                         access_key="testing", secret_key="testing", region="us-east-1")
    with s3.open_input_file(f"{path}/run/summary.json") as stored:
        assert json.loads(stored.read())["epochs"] == 2
    again = cli("run", str(recipe_path), "--resume-or-start", "--set", "train.epochs=2", env=env)  # a retried driver: already done
    assert again.returncode == 0 and "is already finished" in again.stdout, again.stderr[-2000:]
    assert os.path.getsize(tmp_path / "run" / "summary.json") > 0
