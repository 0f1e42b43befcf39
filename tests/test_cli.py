"""The command line's conventions, through the real entry point: --version, usage errors (exit 2,
the usage line, no traceback), an example in every command's help, Ctrl-C (exit 130), messages
through logging at the level of -v / -q (what they do to a run's workers: test_training.py)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import typer

from conftest import ROOT, cli, write_recipe
from raytune_ft import __version__, log
from raytune_ft.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def test_version_prints_the_version_and_exits_0():
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"raytune-ft {__version__}\n"


@pytest.mark.parametrize("args, error", [
    (["--bogus"], "No such option: --bogus"),
    (["run"], "Missing argument"),
    (["validate", "--nope", "x"], "No such option: --nope"),
    (["bogus"], "No such command 'bogus'"),
    (["-v", "-q", "validate", "x"], "Invalid value for '-v' / '-q': give one of them, not both"),
])
def test_a_usage_error_shows_the_usage_line_and_exits_2_without_a_traceback(args, error):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Usage: ") and f"Error: {error}" in lines[-1], result.stderr


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=["raytune-ft", *COMMANDS])
def test_every_help_shows_an_example(command):
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    example = [line for line in result.stdout.splitlines() if "Example: raytune-ft " in line]
    assert example and " ".join(["raytune-ft", *command]) in example[0], result.stdout


def test_ctrl_c_exits_130_with_one_line(cli_in_process, monkeypatch):
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("raytune_ft.cli._load", interrupted)
    assert cli_in_process("validate", "jobs/text_classification.yaml") == (130, "interrupted\n")


def test_messages_go_through_logging_with_the_prefix_stdout_below_warnings_stderr_above(capsys):
    """One handler however often the level is set; a module's logger shows from the level up."""
    logger = logging.getLogger("raytune_ft.some.module")
    log.configure(logging.WARNING)
    log.configure(logging.INFO)
    assert log.level() == logging.INFO
    logger.debug("hidden")
    logger.info("epoch %d done", 1)
    logger.warning("data.train: skipped %d bad rows of %d", 2, 10)
    assert capsys.readouterr() == ("[raytune-ft] epoch 1 done\n", "[raytune-ft] data.train: skipped 2 bad rows of 10\n")
    log.configure(logging.WARNING)  # -q
    logger.info("progress")
    assert capsys.readouterr().out == ""
    log.configure(logging.DEBUG)  # -v
    logger.debug("worker %d of %d", 0, 2)
    assert capsys.readouterr().out == "[raytune-ft] worker 0 of 2\n"
    log.configure(logging.INFO)


def test_quiet_validate_still_prints_its_result():
    result = cli("-q", "validate", "jobs/text_classification.yaml")
    assert result.returncode == 0 and result.stdout.startswith("ok: jobs/text_classification.yaml"), result.stderr


def warm_status(env: dict[str, str], pattern: str, timeout_s: float = 120) -> re.Match:
    """The first match of ``pattern`` in `raytune-ft warm status`, asked until one comes."""
    deadline = time.monotonic() + timeout_s
    while not (match := re.search(pattern, status := cli("warm", "status", env=env).stdout)):
        assert time.monotonic() < deadline, f"{pattern!r} never in: {status}"
        time.sleep(1)
    return match


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_warm_driver_runs_the_commands_started_while_it_is_up(tiny_recipe, tmp_path):
    """`raytune-ft warm start`, then two `raytune-ft run` at once in new processes: each runs in
    the warm driver (its count of commands says so), with the run's outputs, progress lines and
    exit code as without it; the second waits for the first, saying so, while `warm status` still
    answers; a bad input still ends in one line and exit 2. Between commands the driver readies
    one idle process for each actor a run ended, and a third run's actors all start in them.
    `warm stop` ends it."""
    socket_dir = Path(tempfile.mkdtemp(prefix="rtw-", dir="/tmp"))  # a Unix socket's path holds at most 107 bytes
    env = {"RAYTUNE_FT_WARM_SOCKET": str(socket_dir / "warm.sock")}
    tiny_recipe["train"]["epochs"] = 1
    recipe = write_recipe(tiny_recipe, tmp_path / "tiny.yaml")
    assert "no warm driver is up" in cli("warm", "status", env=env).stdout
    started = cli("warm", "start", env=env)
    assert started.returncode == 0 and "warm driver up" in started.stdout, started.stdout + started.stderr
    try:
        first = subprocess.Popen([sys.executable, "-m", "raytune_ft.cli", "run", str(recipe)], cwd=ROOT, env={**os.environ, **env},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while "running: raytune-ft run" not in cli("warm", "status", env=env).stdout:  # status answers during a command
            assert first.poll() is None and time.monotonic() < deadline, "the first run never showed as running"
            time.sleep(0.2)
        second = cli("run", str(recipe), "--output", str(tmp_path / "second"), env=env)
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 0 and second.returncode == 0, stdout + stderr + second.stdout + second.stderr
        assert "[raytune-ft] epoch 1 done" in stdout and "test accuracy" in stdout  # the workers' lines and the table
        assert "waiting for the warm driver to finish its current command" in second.stderr
        assert "2 commands run" in cli("warm", "status", env=env).stdout
        assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "second" / "model").is_dir()
        bad = cli("run", str(tmp_path / "missing.yaml"), env=env)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.yaml" in bad.stderr, bad.stderr
        assert "3 commands run" in cli("warm", "status", env=env).stdout
        assert warm_status(env, r"ready processes: 0 of 0")  # the bad input's command started no actor
        warm_status(env, r"([5-9]) processes ready")  # a run's controller, 2 helpers, 2 workers at least
        third = cli("run", str(recipe), "--output", str(tmp_path / "third"), env=env)
        assert third.returncode == 0, third.stdout + third.stderr
        pooled = warm_status(env, r"started in ready processes: (\d+) of ([1-9]\d*)")
        assert int(pooled.group(2)) >= 5 and pooled.group(1) == pooled.group(2), pooled.group(0)
    finally:
        stopped = cli("warm", "stop", env=env)
    assert "warm driver stopped" in stopped.stdout
    assert not (socket_dir / "warm.sock").exists()
    assert "no warm driver is up" in cli("warm", "status", env=env).stdout
    shutil.rmtree(socket_dir)


def test_a_warm_socket_path_too_long_is_refused_in_one_line():
    result = cli("warm", "start", env={"RAYTUNE_FT_WARM_SOCKET": "/tmp/" + "x" * 120 + "/warm.sock"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "RAYTUNE_FT_WARM_SOCKET" in result.stderr and "107 bytes" in result.stderr
