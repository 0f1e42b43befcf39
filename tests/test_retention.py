"""Capability retention on real Ray: references, mitigations and WiSE-FT on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import strategy_of, write_recipe
from raytune_ft import run
from raytune_ft.recipe import validate_recipe


def body_distance(tuned: dict, base: dict) -> float:
    """Relative L2 distance of the pretrained body's weights from the base model (the pooler
    trains with the head: TextClassification.head_names)."""
    moved = total = 0.0
    for key, value in base.items():
        if key.startswith("pooler."):
            continue
        after = tuned.get("bert." + key, tuned.get(key))
        moved += float((after - value).pow(2).sum())
        total += float(value.pow(2).sum())
    return (moved / total) ** 0.5


def test_head_only_keeps_the_body_bit_identical_and_retains_everything(retention_recipe, local_ray, tiny_bert):
    """The head-only baseline trains the classifier and the pooler alone: every other pretrained
    weight is exported unchanged, so the probe reference on the body's features scores as before,
    exactly."""
    retention_recipe["strategy"] = {"method": "head_only"}
    retention_recipe["train"]["epochs"] = 1
    recipe = validate_recipe(retention_recipe)
    summary = run(recipe)
    before = load_file(tiny_bert / "model.safetensors")
    after = load_file(recipe.run_dir() / "model" / "model.safetensors")
    for key, value in before.items():
        if not key.startswith("pooler."):  # the pooler trains with the head (TextClassification.head_names)
            assert torch.equal(after["bert." + key if "bert." + key in after else key], value), key
    assert not torch.equal(after["bert.pooler.dense.weight"], before["pooler.dense.weight"])
    retention = summary["retention"]
    assert retention["before"]["ref/topics/accuracy"] > 0.5  # the random tiny encoder's features carry topic (chance 1/3)
    assert retention["retention"]["retention/topics/accuracy"] == pytest.approx(1.0)
    assert retention["worst_during_run"] == pytest.approx(1.0)
    assert retention["reference_eval_time_s"] > 0


def test_destroying_features_lowers_retention_and_wise_ft_recovers_it(retention_recipe, local_ray, tiny_bert):
    """A huge learning rate wrecks the encoder; retention falls. WiSE-FT at alpha 0 is the base
    body again (retention exactly 1), at alpha 1 the tuned model; min_retention picks alpha 0."""
    retention_recipe["train"].update(lr=0.3, epochs=2, clip_grad_norm=None)
    retention_recipe["wise_ft"] = {"alphas": [0.0, 1.0], "min_retention": 0.98}
    summary = run(validate_recipe(retention_recipe))
    run_dir = validate_recipe(retention_recipe).run_dir()
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in history if "train/loss" in row][-1]
    assert last["retention/topics/accuracy"] < 0.9

    rows = {row["alpha"]: row for row in summary["wise_ft"]["rows"]}
    before = summary["retention"]["before"]
    assert rows[0.0]["ref/topics/accuracy"] == pytest.approx(before["ref/topics/accuracy"], abs=1e-9)
    assert rows[1.0]["ref/topics/accuracy"] == pytest.approx(last["ref/topics/accuracy"], abs=1e-9)
    assert summary["wise_ft"]["alpha"] == 0.0
    assert summary["retention"]["retention"]["retention/min"] == pytest.approx(1.0)
    # The exported model is the chosen alpha: the base body (the head stays tuned).
    exported = load_file(run_dir / "model" / "model.safetensors")
    assert body_distance(exported, load_file(tiny_bert / "model.safetensors")) < 1e-6


def test_freeze_keeps_bottom_layers_bit_identical(tiny_recipe, local_ray, tiny_bert):
    tiny_recipe["strategy"] = {"method": "freeze", "layers": 1, "layer_lr_decay": 0.8}
    tiny_recipe["train"]["epochs"] = 1
    recipe = validate_recipe(tiny_recipe)
    run(recipe)
    base = load_file(tiny_bert / "model.safetensors")
    tuned = load_file(recipe.run_dir() / "model" / "model.safetensors")
    frozen = [k for k in base if k.startswith(("embeddings.", "encoder.layer.0."))]
    trained = [k for k in base if k.startswith("encoder.layer.1.")]
    assert frozen and trained
    assert all(torch.equal(tuned["bert." + k], base[k]) for k in frozen)
    assert all(not torch.equal(tuned["bert." + k], base[k]) for k in trained if k.endswith("weight"))


def test_lora_leaves_base_untouched_and_merges_on_export(tiny_recipe, local_ray, tiny_bert, sentiment_data):
    tiny_recipe["strategy"] = {"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["query", "value", "dense"]}
    tiny_recipe["train"]["epochs"] = 2
    recipe = validate_recipe(tiny_recipe)
    summary = run(recipe)
    base = load_file(tiny_bert / "model.safetensors")
    tuned = load_file(recipe.run_dir() / "model" / "model.safetensors")
    assert not any("lora" in k for k in tuned)  # merged into plain weights
    # The pooler trains whole with the head (PEFT's modules_to_save, never adapted as well).
    adapted = [k for k in base if k.endswith(("query.weight", "value.weight", "dense.weight")) or k.startswith("pooler.")]
    untouched = [k for k in base if k not in adapted]
    assert all(torch.equal(tuned["bert." + k], base[k]) for k in untouched)
    assert all(not torch.equal(tuned["bert." + k], base[k]) for k in adapted)

    # The merged export, loaded by transformers alone, scores the test set as the adapter model did.
    import pyarrow.parquet as pq
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(recipe.run_dir() / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(recipe.run_dir() / "model")
    rows = pq.read_table(sentiment_data["test"]).to_pylist()
    with torch.no_grad():
        logits = model(**tokenizer([r["sentence"] for r in rows], return_tensors="pt", padding=True)).logits
    labels = torch.tensor([model.config.label2id[r["sentiment"]] for r in rows])
    assert float((logits.argmax(-1) == labels).float().mean()) == pytest.approx(summary["test"]["accuracy"])
    assert float(torch.nn.functional.cross_entropy(logits, labels)) == pytest.approx(summary["test"]["loss"], abs=1e-4)

    # Beside it, the adapter alone: PEFT puts it (adapters and the new head) on the base model and
    # gets the merged model's logits.
    from peft import PeftModel

    adapter = Path(summary["outputs"]["adapter"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base_model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base_model, adapter).eval()(**tokenizer([r["sentence"] for r in rows], return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(adapted, logits, rtol=1e-4, atol=1e-5)


def test_l2sp_with_huge_strength_stays_near_base_and_ewc_replay_run(retention_recipe, local_ray, tiny_bert):
    base = load_file(tiny_bert / "model.safetensors")
    distances = {}
    for name, extra in (
        ("plain", {}),
        ("l2sp", {"regularizer": {"method": "l2sp", "strength": 1e4}}),
        ("ewc_replay", {"regularizer": {"method": "ewc", "strength": 1e3, "fisher_samples": 32},
                        "replay": {"fraction": 0.25, "loss_weight": 1.0}}),
    ):
        recipe_data = {**retention_recipe, **extra, "output": {"dir": str(retention_recipe["output"]["dir"]) + name}}
        recipe_data["train"] = {**retention_recipe["train"], "epochs": 2}
        recipe = validate_recipe(recipe_data)
        summary = run(recipe)
        distances[name] = body_distance(load_file(recipe.run_dir() / "model" / "model.safetensors"), base)
        assert summary["retention"]["retention"]["retention/topics/accuracy"] > 0
    assert distances["l2sp"] < 0.2 * distances["plain"]
    assert distances["ewc_replay"] < distances["plain"]


def test_head_lr_scale_gives_the_head_its_own_learning_rate(tiny_recipe):
    """train.head_lr_scale: the classifier and the pooler (the text task's head) step at lr x 10,
    the encoder at lr, under layer-wise decay too (the head is its top group, scale 1)."""
    from raytune_ft.backends.optim import param_groups
    from raytune_ft.strategies import scale_module_lr
    from raytune_ft.tasks import build_task

    tiny_recipe["strategy"] = {"method": "full", "layer_lr_decay": 0.5}
    recipe = validate_recipe(tiny_recipe)
    task = build_task(recipe, ["negative", "positive"])
    model = strategy_of(tiny_recipe["strategy"]).prepare(task.build_model(), task)
    scale_module_lr(model, task.head_names(model), 10.0)
    lrs = {id(p): group["lr"] for group in param_groups(model, recipe.train) for p in group["params"]}
    named = {name: lrs[id(p)] for name, p in model.named_parameters()}
    lr = recipe.train.lr
    assert named["classifier.weight"] == named["bert.pooler.dense.weight"] == pytest.approx(10 * lr)
    assert named["bert.encoder.layer.1.output.dense.weight"] == pytest.approx(0.5 * lr)  # the top layer, depth 1
    assert named["bert.embeddings.word_embeddings.weight"] == pytest.approx(0.125 * lr)  # below 2 layers, depth 3


def test_lora_lr_scale_speeds_up_the_adapters_only(tiny_recipe):
    """strategy.lr_scale: LoRA's A and B matrices step at lr x 4; the head (saved whole) at lr."""
    from raytune_ft.backends.optim import param_groups
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(tiny_recipe)
    task = build_task(recipe, ["negative", "positive"])
    model = strategy_of({"method": "lora", "rank": 4, "alpha": 8, "lr_scale": 4.0}).prepare(task.build_model(), task)
    lrs = {id(p): group["lr"] for group in param_groups(model, recipe.train) for p in group["params"]}
    named = {name: lrs[id(p)] for name, p in model.named_parameters() if p.requires_grad}
    adapters = [lr for name, lr in named.items() if ".lora_" in name]
    assert adapters and all(lr == pytest.approx(4 * recipe.train.lr) for lr in adapters)
    assert all(lr == pytest.approx(recipe.train.lr) for name, lr in named.items() if ".lora_" not in name)


def test_gradual_and_lp_ft_schedules_on_a_real_model(tiny_recipe):
    """What trains in each epoch, on the real tiny BERT (no Ray needed for the schedule)."""
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(tiny_recipe)
    task = build_task(recipe, ["negative", "positive"])

    def trainable(model):  # classifier, bert.pooler, bert.encoder.layer.N, bert.embeddings
        return {".".join(name.split(".")[:4 if ".layer." in name else 2]) for name, p in model.named_parameters() if p.requires_grad}

    strategy = strategy_of({"method": "gradual"})
    model = strategy.prepare(task.build_model(), task)
    seen = []
    for epoch in (1, 2, 3, 4, 5):
        strategy.on_epoch_start(model, epoch)
        seen.append(trainable(model))
    assert seen[0] == {"classifier.weight", "classifier.bias", "bert.pooler"}  # the head and what follows the layers
    assert seen[1] == seen[0] | {"bert.encoder.layer.1"}
    assert seen[2] == seen[1] | {"bert.encoder.layer.0"}
    assert seen[3] == seen[2] | {"bert.embeddings"} == seen[4]
    assert all(p.requires_grad for p in model.parameters())

    strategy = strategy_of({"method": "lp_ft", "head_epochs": 2})
    model = strategy.prepare(task.build_model(), task)
    assert strategy.on_epoch_start(model, 1) is True
    # The head is the new classifier and the checkpoint's pooler (whose output a frozen one leaves
    # near-constant in sentence encoders): both probe, the encoder waits.
    assert trainable(model) == {"classifier.weight", "classifier.bias", "bert.pooler"}
    assert strategy.on_epoch_start(model, 2) is False
    assert strategy.on_epoch_start(model, 3) is True and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("change, field", [
    ({"strategy": {"method": "lora", "target_modules": ["nonexistent"]}}, "strategy.target_modules"),
    ({"strategy": {"method": "freeze", "layers": 7}}, "strategy.layers"),
    ({"strategy": {"method": "full", "rank": 4}}, "strategy.rank"),
    ({"replay": {"fraction": 0.2}}, "replay"),
    ({"regularizer": {"method": "ewc", "strength": 1.0}}, "regularizer"),
    ({"wise_ft": {"alphas": [0.5, 2.0]}}, "wise_ft.alphas"),
])
def test_bad_retention_configs_are_one_line_errors(tiny_recipe, tmp_path, change, field, cli_in_process):
    recipe_path = write_recipe({**tiny_recipe, **change}, tmp_path / "bad.yaml")
    code, stderr = cli_in_process("run", str(recipe_path))
    assert code == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in stderr, stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
