"""The DeepSpeed backend on real Ray Train: 2 CPU workers (gloo), a tiny BERT, real DeepSpeed.

One uninterrupted run per configuration (DDP, ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload) is
shared by the tests below: the loss-trajectory comparison, the export check and, as the reference,
the resume tests. Every run accumulates 3 micro-batches per step over 40 micro-batches an epoch,
so each epoch ends on a partial accumulation, and keeps the best epoch by accuracy, which
snapshots (and at the end restores) the weights under every stage. Every run has an L2-SP penalty
(lambda 10: lr x lambda x steps = 3e-3 x 10 x 42, a pull of 1.3 times the distance over the run), whose
proximal step acts on each stage's own master weights (DDP's parameters, ZeRO-1/2 fragments of the
flat optimizer partition, ZeRO-3 partitions): a step lost on any stage leaves its trajectory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, run_in_fixture, tiny_recipe_dict, write_recipe
from raytune_ft import run
from raytune_ft.errors import TrainingFailed
from raytune_ft.recipe import validate_recipe

CONFIGS = {  # deepspeed options, None for ddp; the hardest first, so a failure shows early
    "zero3_offload": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
    "zero3": {"zero_stage": 3},
    "zero2": {"zero_stage": 2},
    "zero1": {"zero_stage": 1},
    "ddp": None,
}


def recipe_for(config: str, tiny_bert, sentiment_data, run_dir) -> dict:
    recipe = tiny_recipe_dict(tiny_bert, sentiment_data, run_dir)
    recipe["train"].update(epochs=3, batch_size=4, grad_accum=3, early_stopping={"metric": "eval/accuracy", "mode": "max", "patience": 10})
    recipe["regularizer"] = {"method": "l2sp", "strength": 10.0}
    if CONFIGS[config] is not None:
        recipe["train"]["backend"] = "deepspeed"
        recipe["deepspeed"] = CONFIGS[config]
    return recipe


def epoch_rows(run_dir: str | Path) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/loss" in row]


@pytest.fixture(scope="module")
def straight_runs(tiny_bert, sentiment_data, local_ray, tmp_path_factory) -> dict:
    """Every configuration trained once, uninterrupted: name -> its summary."""
    recipes = {config: validate_recipe(recipe_for(config, tiny_bert, sentiment_data, tmp_path_factory.mktemp(config) / "run")) for config in CONFIGS}
    return {config: run_in_fixture(lambda force, recipe=recipe: run(recipe, force=force)) for config, recipe in recipes.items()}


def exported_weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(summary["outputs"]["model"]) / "model.safetensors")


@pytest.mark.timeout(1800)  # its setup trains every configuration (the module's shared runs)
def test_zero_stages_follow_the_ddp_loss_trajectory(straight_runs):
    """Same model, seed, data order, optimizer and schedule: only the order of floating-point sums
    differs (DDP all-reduces gradient buckets; ZeRO reduce-scatters flat partitions and clips with
    its own norm computation). Those ~1e-7 relative differences compound over 42 AdamW steps at
    lr 3e-3: measured agreement is ~1e-5 relative, not bitwise. The tolerance, 1e-3, leaves room for
    other thread counts and BLAS builds and stays below what one optimizer step changes in an
    epoch's mean loss here (~1e-2), so a missed or extra step, a wrong boundary or lr fails it."""
    ddp = straight_runs["ddp"]
    reference = epoch_rows(ddp["outputs"]["run_dir"])
    for config, summary in straight_runs.items():
        rows = epoch_rows(summary["outputs"]["run_dir"])
        assert [row["step"] for row in rows] == [14, 28, 42], config
        for mine, theirs in zip(rows, reference):
            for key in ("train/loss", "eval/loss", "train/lr"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-5), (config, mine["epoch"], key)
        assert summary["test"]["loss"] == pytest.approx(ddp["test"]["loss"], rel=1e-3, abs=1e-5), config
        assert summary["test"]["accuracy"] > 0.8, config  # chance is 0.5


def test_zero3_with_cpu_offload_exports_a_model_transformers_loads(straight_runs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    summary = straight_runs["zero3_offload"]
    assert summary["backend"] == "deepspeed" and summary["test"]["count"] == 96
    model = AutoModelForSequenceClassification.from_pretrained(summary["outputs"]["model"])
    tokenizer = AutoTokenizer.from_pretrained(summary["outputs"]["model"])
    ddp = exported_weights(straight_runs["ddp"])
    assert model.state_dict().keys() >= ddp.keys()  # consolidated, full-size weights, not shards
    for key, value in ddp.items():
        assert model.state_dict()[key].shape == value.shape, key
    inputs = tokenizer(["the drug was excellent for me", "the drug was dreadful for me"], return_tensors="pt", padding=True)
    predicted = model(**inputs).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == ["positive", "negative"]


@pytest.mark.slow
def test_resume_after_crash_matches_uninterrupted_run(straight_runs, tiny_bert, sentiment_data, tmp_path, monkeypatch):
    """Epoch 1's sharded checkpoint is reported by both ranks, then rank 0 crashes; resuming loads
    every rank's shard and ends with the uninterrupted run's weights. ZeRO-3 only: its checkpoint
    holds every partition ZeRO-1 and 2 write (optimizer states) and the parameters' besides, through
    the same save and load calls (a ZeRO-2 case cost the suite 72 s and covered nothing more)."""
    config = "zero3"
    recipe = recipe_for(config, tiny_bert, sentiment_data, tmp_path / "resumed")
    monkeypatch.setenv("RAYTUNE_FT_FAULT", "raise_after_epoch:1")
    with pytest.raises(TrainingFailed, match="injected fault after epoch 1"):
        run(validate_recipe(recipe))
    monkeypatch.delenv("RAYTUNE_FT_FAULT")
    checkpoint = tmp_path / "resumed" / "checkpoint_epoch_0001"
    shards = {path.name.split("_mp_rank")[0] for path in (checkpoint / "deepspeed").glob("zero_pp_rank_*")}
    assert shards == {"zero_pp_rank_0", "zero_pp_rank_1"}  # both ranks' shards in the one reported directory
    epoch_1 = json.loads((checkpoint / "trainer_state.json").read_text())["history"][0]
    resumed_summary = run(validate_recipe(recipe), resume=True)
    # Epoch 1's row, timings included, comes from the checkpoint: the run resumed, not restarted.
    assert epoch_rows(tmp_path / "resumed")[0] == epoch_1

    straight, resumed = exported_weights(straight_runs[config]), exported_weights(resumed_summary)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [row["epoch"] for row in epoch_rows(tmp_path / "resumed")] == [1, 2, 3]


BAD_OPTIONS = [
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: Input should be less than or equal to 3 (got 4)"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_params=cpu"], "deepspeed.offload_params: offloading parameters needs zero_stage 3 (got 2)"),
    (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=cpu"], "deepspeed.offload_optimizer: offloading the optimizer needs zero_stage 1, 2 or 3 (got 0)"),
    (["deepspeed.config={gradient_accumulation_steps: 4}"],
     "deepspeed.config.gradient_accumulation_steps: 4 conflicts with train.grad_accum (1); set it there"),
    (["deepspeed.config={zero_optimization: {stage: 1}}"], "deepspeed.config.zero_optimization.stage: 1 conflicts with deepspeed.zero_stage (2)"),
    (["deepspeed.config={optimizer: {type: Adam}}"], "deepspeed.config.optimizer: set by train.optimizer and train.lr"),
    (["train.precision=fp16"], "train.precision: fp16 with deepspeed needs scaling.use_gpu: true"),
]


@pytest.mark.parametrize("overrides,expected", BAD_OPTIONS, ids=[e.split(":")[0] for _, e in BAD_OPTIONS])
def test_bad_deepspeed_options_give_one_line_errors(overrides, expected, tiny_recipe, tmp_path, cli_in_process):
    path = write_recipe(tiny_recipe, tmp_path / "tiny.yaml")
    sets = [arg for override in ["train.backend=deepspeed", *overrides] for arg in ("--set", override)]
    code, stderr = cli_in_process("validate", str(path), *sets)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr


def test_deepspeed_recipe_lines_validate(tiny_recipe, tmp_path):
    path = write_recipe(tiny_recipe, tmp_path / "tiny.yaml")
    result = cli("validate", str(path), "--set", "train.backend=deepspeed", "--set", "deepspeed.zero_stage=3",
                 "--set", "deepspeed.config={zero_optimization: {stage: 3, stage3_max_live_parameters: 100000000}, gradient_accumulation_steps: 1}")
    assert result.returncode == 0, result.stderr
    assert "backend deepspeed" in result.stdout


def test_zero3_fp32_master_partitions_are_the_parameter_partitions():
    """fp32 ZeRO-3 keeps no second copy of its parameter partitions as optimizer masters, and
    sharing them changes no weight (bitwise the same after 3 steps)."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("zero3_master_partitions.py"))], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["plain"] == [False]  # DeepSpeed alone copies them: if this fails, its own aliasing works again
    assert outcome["shared"] == [True] and outcome["equal"], outcome


MMAP_PROBE = """
import ctypes, sys
from raytune_ft.backends.deepspeed import prepare_worker

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    prepare_worker()
libc.free(libc.malloc(16 << 20))  # by glibc's default, the threshold rises to 16 MiB here
before = libc.mallinfo2().hblks
libc.malloc(8 << 20)
print(libc.mallinfo2().hblks > before)
"""


@pytest.mark.parametrize("threshold, mapped", [("default", "False"), ("fixed", "True")])
def test_deepspeed_workers_return_freed_memory(threshold, mapped):
    """The DeepSpeed backend fixes glibc's mmap threshold (``prepare_worker``, run as the model
    is built): after a large tensor is freed, an 8 MiB one is still memory-mapped (it goes back to
    the system when freed); by glibc's default it comes from the heap, which keeps it."""
    done = subprocess.run([sys.executable, "-c", MMAP_PROBE, threshold], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [mapped]
