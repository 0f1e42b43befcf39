"""The compression post-steps on a finished tiny text run: quantize (CLI, export round trip, end of
a run) and prune (sparsity reached per scope, mask-keeping fine-tune, bad options)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli, copy_run


def test_quantize_cli_writes_a_smaller_model_that_reloads_to_the_same_logits(finished_text_run, tmp_path):
    from raytune_ft.post.compression import load_quantized, quantize_linear, quantized_layers
    from raytune_ft.post.finished import FinishedRun

    run_dir = copy_run(finished_text_run, tmp_path)
    result = cli("post", str(run_dir), "--step", "quantize", "--set", "post.quantize.latency_batches=3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "post" / "quantize.json").read_text())
    before, after = report["table"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert before["accuracy"] == pytest.approx(summary["test"]["accuracy"])  # the run's own test number
    assert after["size_mb"] < before["size_mb"]
    assert abs(report["accuracy_delta"]) <= 0.1
    assert before["latency_ms"] > 0 and after["latency_ms"] > 0 and "1 thread" in report["latency"]
    assert report["layers"] == 2 * 6 + 2  # per layer q, k, v, out, up, down; the pooler and the classifier

    directory = run_dir / "post" / "quantized"
    assert [p.name for p in directory.iterdir() if p.suffix not in (".json", ".txt")] == ["quantized.safetensors"]  # no pickle
    assert (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()
    run = FinishedRun.open(run_dir)
    in_memory = quantize_linear(run.load_model(), "per_tensor")
    reloaded = load_quantized(run, directory)
    assert len(quantized_layers(reloaded)) == report["layers"]
    batch = next(run.batches("test", 16))
    with torch.no_grad():
        expected = in_memory(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, expected)


def test_per_channel_weights_round_trip(finished_text_run, tmp_path):
    from raytune_ft.post import run_steps
    from raytune_ft.post.compression import load_quantized, quantize_linear
    from raytune_ft.post.finished import FinishedRun

    run = FinishedRun.open(copy_run(finished_text_run, tmp_path), ["post.quantize.weights=per_channel", "post.quantize.latency_batches=1"])
    report = run_steps(run, ["quantize"])["quantize"]
    assert report["weights"] == "per_channel" and abs(report["accuracy_delta"]) <= 0.1
    batch = next(run.batches("test", 16))
    with torch.no_grad():
        expected = quantize_linear(run.load_model(), "per_channel")(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded = load_quantized(run, run.run_dir / "post" / "quantized")
        assert torch.equal(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, expected)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_reaches_the_sparsity_and_exports_it(finished_text_run, tmp_path, scope):
    from raytune_ft.post import run_steps
    from raytune_ft.post.compression import prunable, zero_fraction
    from raytune_ft.post.finished import FinishedRun

    run = FinishedRun.open(copy_run(finished_text_run, tmp_path), [f"post.prune.scope={scope}", "post.prune.sparsity=0.6"])
    report = run_steps(run, ["prune"])["prune"]
    assert report["sparsity_pruned"] == pytest.approx(0.6, abs=1e-3)  # layer: each rounds to whole weights
    assert 0 < report["sparsity_all"] < 0.05  # the tiny BERT is mostly embeddings, which are not pruned
    low, high = report["layer_sparsity_range"]
    if scope == "layer":
        assert low == pytest.approx(0.6, abs=1e-3) and high == pytest.approx(0.6, abs=1e-3)
    else:
        assert low < 0.6 < high  # one threshold: layers with smaller weights lose more
    assert [row["model"] for row in report["table"]] == ["fine-tuned (model/)", f"pruned ({scope})"]

    exported = run.load_model(run.run_dir / "post" / "pruned")
    layers = prunable(run, exported)
    assert len(layers) == report["layers"] == 2 * 6  # not the head: the classifier and the pooler
    assert zero_fraction([layer.weight for layer in layers.values()]) == pytest.approx(report["sparsity_pruned"])
    assert zero_fraction([exported.classifier.weight]) == 0
    assert run.evaluate(exported)["accuracy"] == pytest.approx(report["table"][-1]["accuracy"])


def test_finetune_keeps_the_pruned_weights_at_zero(finished_text_run, tmp_path):
    from raytune_ft.post import run_steps
    from raytune_ft.post.compression import prunable
    from raytune_ft.post.finished import FinishedRun

    run = FinishedRun.open(copy_run(finished_text_run, tmp_path), ["post.prune.sparsity=0.7", "post.prune.finetune_steps=20"])
    original = run.load_model()
    weights = {name: layer.weight.detach() for name, layer in prunable(run, original).items()}
    magnitudes = torch.cat([w.abs().flatten() for w in weights.values()])
    threshold = magnitudes.kthvalue(round(0.7 * magnitudes.numel())).values  # global L1: the 70% smallest go

    report = run_steps(run, ["prune"])["prune"]
    tuned = {name: layer.weight.detach() for name, layer in prunable(run, run.load_model(run.run_dir / "post" / "pruned")).items()}
    for name, weight in weights.items():
        pruned = weight.abs() <= threshold
        assert (tuned[name][pruned] == 0).all(), name
        assert not torch.equal(tuned[name][~pruned], weight[~pruned]), f"{name}: the fine-tune did not change it"
    assert report["sparsity_pruned"] == pytest.approx(0.7, abs=1e-4)
    original_row, pruned_row, tuned_row = report["table"]
    assert tuned_row["model"] == "pruned + 20 fine-tune steps" and report["finetune_time_s"] > 0
    assert tuned_row["accuracy"] >= pruned_row["accuracy"] - 0.05


@pytest.mark.parametrize("override, field", [
    ("post.prune.sparsity=1.5", "post.prune.sparsity"),
    ("post.prune.scope=row", "post.prune.scope"),
    ("post.prune.finetune_step=5", "post.prune.finetune_step"),
    ("post.quantize.weights=int4", "post.quantize.weights"),
])
def test_bad_option_is_a_one_line_error(cli_in_process, finished_text_run, override, field):
    code, err = cli_in_process("post", str(finished_text_run), "--step", "prune", "--set", override)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and field in err, err


def test_load_quantized_names_a_missing_export(finished_text_run, tmp_path):
    from raytune_ft.errors import UserError
    from raytune_ft.post.compression import load_quantized
    from raytune_ft.post.finished import FinishedRun

    with pytest.raises(UserError, match="quantized.safetensors: missing"):
        load_quantized(FinishedRun.open(finished_text_run), tmp_path)


def test_recipe_post_quantize_runs_at_the_end_of_a_run(tiny_recipe, tmp_path, local_ray):
    from raytune_ft.recipe import validate_recipe
    from raytune_ft import run

    tiny_recipe["scaling"]["workers"] = 1
    tiny_recipe["train"]["epochs"] = 1
    tiny_recipe["post"] = {"quantize": {"latency_batches": 2}}
    summary = run(validate_recipe(tiny_recipe))
    run_dir = tmp_path / "run"
    report = json.loads((run_dir / "post" / "quantize.json").read_text())
    assert report["table"][1]["size_mb"] < report["table"][0]["size_mb"]
    assert (run_dir / "post" / "quantized" / "quantized.safetensors").is_file()
    from raytune_ft.report.tables import summary_table

    assert "quantize (int8, 14 Linear layers): size" in summary_table(summary)  # the run's closing table
