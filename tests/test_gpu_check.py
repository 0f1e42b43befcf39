"""The GPU check (``benchmarks/gpu_check.sh``) without a GPU: its dry run goes through the real
script, every part on the CPU with tiny models on the project's local Ray, and writes the files
a GPU run writes; then the arithmetic and the peaks the GPU run relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("gpu_overhead.json", "gpu_mfu.json", "gpu_zero3_memory.json", "gpu_env.json")

# Several Ray runs and torchruns (minutes): `make test-gpu-check`, before a session spends its GPU time.
pytestmark = [pytest.mark.slow, pytest.mark.gpu_check]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict[str, Path]:
    """``benchmarks/gpu_check.sh --dry-run``, with $OUT set as the GPU machine sets it."""
    base = tmp_path_factory.mktemp("gpu_check")
    (base / "out").mkdir()
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}  # a user's shell, as tests' cli() has it
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--output-dir", str(base / "results"), "--work-dir", str(base / "work")],
        cwd=ROOT, env={**env, "PYTHON": sys.executable, "OUT": str(base / "out")}, capture_output=True, text=True,
        timeout=int(os.environ.get("RAYTUNE_FT_TEST_HANG_LIMIT_S", "420")) - 20,  # a failure with its output, before conftest's guard
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"results": base / "results", "out": base / "out", "work": base / "work"}


def read(dry_run: dict[str, Path], name: str) -> dict:
    return json.loads((dry_run["results"] / name).read_text())


def test_every_part_completes_and_comes_back_through_out(dry_run):
    env = read(dry_run, "gpu_env.json")
    assert env["parts"] == {"overhead": "completed", "mfu": "completed", "zero3": "completed"}
    assert set(env["seconds"]) == {"overhead", "mfu", "zero3", "total"}
    assert env["versions"]["ray"] and env["versions"]["deepspeed"] and env["versions"]["torch"] and env["disk_free_bytes"] > 0
    for name in FILES:
        content = read(dry_run, name)
        assert content["dry_run"] is True and content["device"] == "cpu" and content["gpu_name"] is None
        assert content.get("failures", []) == []
        assert (dry_run["out"] / name).read_text() == (dry_run["results"] / name).read_text()
    assert "==> smollm2_135m_raytune_ft.log <==" in (dry_run["out"] / "gpu_check_logs.txt").read_text()
    assert "[gpu-check] zero3: completed" in (dry_run["out"] / "gpu_check_output.txt").read_text()
    assert not any((dry_run["work"] / folder).exists() for folder in ("smollm2_135m", "llama_1b", "zero3"))  # models and runs removed


def test_overhead_compares_both_sides_on_the_same_rows(dry_run):
    overhead = read(dry_run, "gpu_overhead.json")
    ours, plain = overhead["raytune_ft"], overhead["plain_torchrun"]
    epochs = overhead["setup"]["epochs"]
    assert len(ours["samples_per_s_by_epoch"]) == len(plain["samples_per_s_by_epoch"]) == epochs
    assert ours["train_rows"] == plain["train_rows"] == overhead["setup"]["batch_size"] * overhead["setup"]["steps_per_epoch"]
    assert overhead["ratio"] == pytest.approx(ours["steady_samples_per_s"] / plain["steady_samples_per_s"])
    assert overhead["meets_target"] == (overhead["ratio"] >= 0.95)
    assert overhead["setup"]["workers"] == 1 and overhead["setup"]["attention"] == "sdpa"


def test_mfu_counts_the_flops_of_each_model(dry_run):
    mfu = read(dry_run, "gpu_mfu.json")
    assert mfu["peak_flop_per_s"] is None and "no dense bf16 peak" in mfu["peak_source"]  # a CPU has none on record
    assert "unfinished" not in mfu  # the file written after SmolLM2 alone was replaced
    assert set(mfu["models"]) == {"smollm2_135m", "llama_1b"}
    for model in mfu["models"].values():
        assert model["flops_per_token"] == 6 * model["params"] + 12 * model["layers"] * model["hidden"] * model["seq_len"]
        for side in (model["raytune_ft"], model["plain_torch"]):
            assert side["tokens_per_s"] == pytest.approx(side["samples_per_s"] * model["seq_len"])
            assert side["tflop_per_s"] == pytest.approx(side["tokens_per_s"] * model["flops_per_token"] / 1e12)
            assert side["mfu"] is None
        assert model["meets_target"] is None


def test_zero3_memory_rows_through_the_backends(dry_run):
    zero3 = read(dry_run, "gpu_zero3_memory.json")
    assert set(zero3["rows"]) == {"ddp", "zero3_offload_optimizer", "zero3_offload_optimizer_and_params"}
    assert zero3["measure"] == "peak_rss_bytes"  # no GPU memory on a CPU
    for row in zero3["rows"].values():
        assert row["completed"] and row["params"] == zero3["model"]["params"] and row["model_state_bytes"] > 0
        assert row["peak_gpu_bytes"] is None and row["peak_rss_bytes"] > 0
    assert set(zero3["ratio_to_ddp"]) == {"zero3_offload_optimizer", "zero3_offload_optimizer_and_params"}


def import_gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_check


def test_a_command_past_its_timeout_goes_with_all_it_started(tmp_path):
    """A run that outlasts its limit on the GPU machine must not leave a worker holding the GPU:
    torchrun starts its workers in sessions of their own, out of reach of the process group."""
    import psutil

    overhead = import_gpu_check().overhead
    started = tmp_path / "worker.pid"
    launcher = ("import subprocess, sys, time\n"
                "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
                "open(sys.argv[1], 'w').write(str(worker.pid))\n"
                "time.sleep(300)\n")
    with pytest.raises(RuntimeError, match="killed after 20 s"):
        overhead.run_logged([sys.executable, "-c", launcher, str(started)], timeout=20)
    worker = int(started.read_text())

    def alive() -> bool:
        try:
            return psutil.Process(worker).status() != psutil.STATUS_ZOMBIE  # killed, not yet reaped by its new parent
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()


def test_peaks_and_model_sizes_of_the_gpu_run():
    """What the GPU run computes without a GPU: the peak it divides by, and the sizes it claims."""
    import torch
    from transformers import AutoModelForCausalLM

    gpu_check = import_gpu_check()
    assert gpu_check.dense_bf16_peak("NVIDIA H100 80GB HBM3")[0] == 989e12  # the SXM part, as the lent machine reports it
    assert gpu_check.dense_bf16_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu_check.dense_bf16_peak("NVIDIA H200")[0] == 989e12
    assert gpu_check.dense_bf16_peak("NVIDIA A100-SXM4-80GB")[0] is None
    assert gpu_check.utilisation(10.0, 2048, 1e9, 989e12)["mfu"] == pytest.approx(10 * 2048 * 1e9 / 989e12)

    def params(config) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    assert params(gpu_check.smollm2_135m_config(dry=False)) == 134_515_008  # SmolLM2-135M's count
    assert 0.95e9 < params(gpu_check.llama_1b_config(dry=False)) < 1.05e9


def test_a_failed_side_leaves_its_error_and_the_other_side_still_counts(tmp_path, monkeypatch):
    """A GPU is lent for minutes: when raytune-ft's run fails, torchrun's still runs and its MFU is
    still computed, the failure is named, and the workload's files are removed."""
    gpu_check = import_gpu_check()
    work = tmp_path / "work"

    def prepare(check, workload, config) -> Path:
        (work / workload.name).mkdir(parents=True)
        return work / workload.name / "recipe.yaml"

    def raytune_ft(*_, **__):
        raise RuntimeError("-m raytune_ft.cli run ... exited 1; its last lines:\ntorch.OutOfMemoryError: CUDA out of memory")

    plain = {"samples_per_s_by_epoch": [1.0, 2.0], "steady_samples_per_s": 2.0, "train_rows": 24, "attention": "sdpa"}
    monkeypatch.setattr(gpu_check, "prepare", prepare)
    monkeypatch.setattr(gpu_check.overhead, "raytune_ft", raytune_ft)
    monkeypatch.setattr(gpu_check.overhead, "plain", lambda *_, **__: dict(plain))
    check = gpu_check.Check(dry=True, work=work, output=tmp_path, out=None, threads=1, timeout_s=10, gpu={})

    overhead = gpu_check.overhead_part(check)
    assert overhead["ratio"] is None and overhead["meets_target"] is None
    assert overhead["failures"] == ["raytune_ft: torch.OutOfMemoryError: CUDA out of memory"]
    assert overhead["plain_torchrun"]["steady_samples_per_s"] == 2.0
    mfu = gpu_check.mfu_part(check)
    assert len(mfu["failures"]) == 2 and all("CUDA out of memory" in line for line in mfu["failures"])
    for name, model in mfu["models"].items():
        assert "error" in model["raytune_ft"] and model["raytune_ft_over_plain"] is None
        assert model["plain_torch"]["tokens_per_s"] == 2.0 * model["seq_len"]
        assert not (work / name).exists()


def test_the_run_path_imports_nothing_the_gpu_machine_lacks():
    """The GPU machine has no gguf, optuna, mlflow, cryptography or virtualenv, and none travels:
    the check's modules and the loop's import without them."""
    code = ("import sys\n"
            "for name in ('gguf', 'optuna', 'mlflow', 'cryptography', 'virtualenv'): sys.modules[name] = None\n"
            "sys.path.insert(0, 'benchmarks')\n"
            "import gpu_check, plain_ddp, raytune_ft.cli, raytune_ft.train.runner, raytune_ft.train.loop, raytune_ft.backends.deepspeed\n"
            "import ray.train.torch, ray.data\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
