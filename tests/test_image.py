"""Image classification: a tiny EfficientNet on real Fashion-MNIST through the real pipeline (two
Ray Train workers), the real EfficientNet-Lite0 weights read weights-only, and bad images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_EFFICIENTNET, strategy_of, unit_recipe, write_recipe
from raytune_ft import run
from raytune_ft.errors import UserError
from raytune_ft.recipe import validate_recipe


def image_recipe(model: Path, run_dir: Path, **data) -> dict:
    return {
        "name": "tiny_image",
        "task": {"type": "image_classification", "image_size": 32, "crop_scale": 0.85, "rotation": 5},
        "model": {"path": str(model)},
        "data": {"train": "asset:fashion-mnist/train", "test": "asset:fashion-mnist/test", "max_rows": 320,
                 "validation_fraction": 0.1, "columns": {"image": "image", "label": "label"}, **data},
        "train": {"lr": 5e-3, "epochs": 4, "batch_size": 16, "schedule": "constant", "seed": 3, "log_every": 10},
        "scaling": {"workers": 2},
        "baseline": {"enabled": False},  # the shipped recipe's run measures it; here it would double the time
        "output": {"dir": str(run_dir)},
    }


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """``root/<class>/<n>.png``: 24 real Fashion-MNIST images of two classes, and one file that is
    not an image (``Trouser/broken.png``)."""
    import pyarrow.dataset as pads

    from raytune_ft.data import assets

    table = pads.dataset(assets.fashion_mnist("test")).head(200).to_pylist()
    root = tmp_path / "images"
    for name in ("Trouser", "Bag"):
        (root / name).mkdir(parents=True)
        for i, row in enumerate([r for r in table if r["label"] == name][:12]):
            (root / name / f"{i}.png").write_bytes(row["image"])
    (root / "Trouser" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    return root


def test_tiny_efficientnet_learns_fashion_mnist_on_two_workers(tiny_efficientnet, local_ray, tmp_path):
    recipe = validate_recipe(image_recipe(tiny_efficientnet, tmp_path / "run"))
    summary = run(recipe)
    run_dir = recipe.run_dir()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if "train/loss" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert summary["test"]["count"] == 320  # sharded evaluation drops and repeats no row
    assert summary["test"]["accuracy"] > 0.3  # chance is 0.1
    assert (run_dir / "plots" / "learning_curves.png").stat().st_size > 0
    assert (run_dir / "plots" / "confusion_matrix.png").stat().st_size > 0

    # The export is safetensors + JSON only, and reloads without raytune_ft's task or recipe.
    from safetensors.torch import load_file

    from raytune_ft.models.efficientnet_lite import EfficientNetLite

    assert sorted(p.name for p in (run_dir / "model").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["labels"][0] == "Ankle boot" and config["num_labels"] == 10 and config["image_size"] == 32
    model = EfficientNetLite(config)
    model.load_state_dict(load_file(run_dir / "model" / "model.safetensors"), strict=True)
    assert model.classifier.out_features == 10


def test_same_recipe_and_seed_give_the_same_metrics_and_weights(tiny_efficientnet, local_ray, tmp_path):
    """Every source of randomness is seeded (weights of the new head, data split and shuffle,
    augmentation per seed, epoch and rank, dropout): two 2-worker runs of one augmented recipe
    give the same metrics and the same exported weights."""
    from safetensors.torch import load_file

    sizing = {"train": {"lr": 5e-3, "epochs": 2, "batch_size": 16, "schedule": "constant", "seed": 3, "log_every": 10}}
    runs = []
    for name in ("first", "second"):
        recipe = validate_recipe(image_recipe(tiny_efficientnet, tmp_path / name, max_rows=96) | sizing)
        summary = run(recipe)
        history = [json.loads(line) for line in (recipe.run_dir() / "metrics.jsonl").read_text().splitlines()]
        clock = ("time", "per_s", "wait")  # how fast, not what was learned
        runs.append((summary["test"], [{k: v for k, v in row.items() if not any(word in k for word in clock)} for row in history],
                     load_file(recipe.run_dir() / "model" / "model.safetensors")))
    (test_a, history_a, weights_a), (test_b, history_b, weights_b) = runs
    assert test_a == test_b and history_a == history_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


def test_frozen_body_keeps_batch_norm_statistics(tiny_efficientnet):
    """Head-only training must leave the body bit-identical: frozen batch norms stay in eval mode."""
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(image_recipe(tiny_efficientnet, Path("unused")))
    task = build_task(recipe, [str(i) for i in range(3)])
    model = strategy_of({"method": "head_only"}).prepare(task.build_model(), task)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    model.train()
    loss, _ = task.forward(model, {"pixels": torch.randn(8, 3, 32, 32), "labels": torch.randint(0, 3, (8,))})
    loss.backward()
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    assert model.classifier.weight.grad is not None and model._conv_stem.weight.grad is None


def test_augmentation_on_the_device_is_seeded_and_train_only(tiny_efficientnet):
    """The loop augments each train batch after collate, drawing from torch's generator, which it
    reseeds per (seed, epoch, rank): the same seed moves the same pixels, another seed others, and
    a batch keeps its shape and layout; options that augment nothing leave it as it was."""
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(image_recipe(tiny_efficientnet, Path("unused")))
    task = build_task(recipe, [str(i) for i in range(10)])
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    batch = task.collate({"pixels": pixels, "labels": np.arange(6)})

    def augmented(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return task.augment(dict(batch))["pixels"]

    first = augmented(1)
    assert first.shape == batch["pixels"].shape and first.is_contiguous()
    assert torch.equal(first, augmented(1)) and not torch.equal(first, augmented(2))
    assert not torch.equal(first, batch["pixels"])
    plain = validate_recipe(image_recipe(tiny_efficientnet, Path("unused")) | {
        "task": {"type": "image_classification", "image_size": 32, "crop_scale": 1, "flip": False, "rotation": 0}})
    assert build_task(plain, [str(i) for i in range(10)]).augment(batch)["pixels"] is batch["pixels"]


def test_gradients_have_the_layout_of_their_ddp_buckets(tiny_efficientnet):
    """DDP's gradient buckets take each parameter's strides, and DDP compares each new gradient's
    strides with its bucket's: a gradient in another layout is copied over every step, with
    PyTorch's "Grad strides do not match bucket view strides" warning. The image batches arrive in
    the weights' own (contiguous) layout, augmented or not, so every gradient has its weight's
    strides, size-1 dimensions included (autograd alone would let those differ)."""
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(image_recipe(tiny_efficientnet, Path("unused")))
    task = build_task(recipe, [str(i) for i in range(10)])
    model = task.build_model()
    batch = task.collate({"pixels": np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), "labels": np.arange(4)})
    for inputs in (batch, task.augment(dict(batch))):
        model.zero_grad(set_to_none=True)  # as the backends do: every step's gradients are new tensors
        loss, _ = task.forward(model, inputs)
        loss.backward()
        assert [name for name, p in model.named_parameters() if p.grad.stride() != p.stride()] == []


def test_replay_forward_leaves_batch_norm_statistics_to_the_target_batches(tiny_efficientnet):
    """A replay batch (a few rows of another distribution) is normalised with the running
    statistics and does not move them; the model stays in train mode and still gets gradients."""
    from raytune_ft.addons.replay import running_statistics_kept
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(image_recipe(tiny_efficientnet, Path("unused")))
    task = build_task(recipe, [str(i) for i in range(3)])
    model = task.build_model().train()
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    replayed = torch.randn(4, 3, 32, 32) * 3 + 1
    with running_statistics_kept(model):
        features = task.embed(model, {"pixels": replayed})
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in statistics.items())
    assert model.training and all(m.training for m in model.modules())
    features.sum().backward()
    assert model._conv_stem.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(features, task.embed(model.eval(), {"pixels": replayed}))
    model.train()
    task.embed(model, {"pixels": replayed})  # without it, a train-mode forward moves them
    assert not torch.equal(statistics["_bn0.running_mean"], model._bn0.running_mean)


def test_efficientnet_lite0_loads_weights_only_and_recognises_a_photo():
    """All 296 tensors of the real package load strictly into our architecture (weights-only
    unpickling of the legacy file), and Grace Hopper's photo (shipped with matplotlib) is ImageNet
    class 652, military uniform."""
    import matplotlib
    from PIL import Image

    from raytune_ft.data import assets
    from raytune_ft.models.efficientnet_lite import LITE0, EfficientNetLite, read_legacy_checkpoint
    from raytune_ft.tasks.image_classification import ImageClassification

    state = read_legacy_checkpoint(assets.efficientnet_lite0())
    assert len(state) == 296
    model = EfficientNetLite(LITE0)
    model.load_state_dict(state, strict=True)  # every tensor used, none missing
    model.eval()
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB").resize((224, 224))
    task = ImageClassification(unit_recipe({"type": "image_classification", "image_size": 224}, "unused"), ["a", "b"])
    batch = task.collate({"pixels": np.asarray(photo)[None], "labels": np.zeros(1, dtype=np.int64)})
    with torch.no_grad():
        probabilities = model(batch["pixels"]).softmax(-1)[0]  # [1000]
    assert probabilities.shape == (1000,) and abs(float(probabilities.sum()) - 1) < 1e-4
    assert int(probabilities.argmax()) == 652

    # The task keeps that body and puts a new head on it.
    task.model_path = str(assets.efficientnet_lite0())
    tuned = task.build_model()
    assert tuned.classifier.out_features == 2
    assert torch.equal(tuned._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"])


class Payload:
    """Not a tensor: a weights-only load must refuse to build it."""


def test_checkpoint_with_objects_is_refused(tmp_path):
    from raytune_ft.models.efficientnet_lite import read_legacy_checkpoint

    path = tmp_path / "evil.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1), "payload": Payload()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="is not a weights-only torch checkpoint"):
        read_legacy_checkpoint(path)


def test_corrupt_image_is_a_one_line_error(tiny_efficientnet, image_folder, tmp_path, cli_on_test_ray):
    """Found while Ray Data decodes the folder (the command line's main, on this file's Ray)."""
    recipe = image_recipe(tiny_efficientnet, tmp_path / "run", train=str(image_folder), test=None, max_rows=None)
    code, stderr = cli_on_test_ray("run", str(write_recipe(recipe, tmp_path / "r.yaml")))
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.strip().splitlines() if "broken.png" in line or line.startswith("error")]
    assert len(lines) == 1, stderr[-2000:]  # Ray's own warnings aside, one line
    assert lines[0].startswith(f"error: {image_folder / 'Trouser' / 'broken.png'}: cannot decode image"), lines[0]
    assert stderr.strip().splitlines()[-1] == lines[0]


def test_skip_mode_counts_bad_rows_and_refuses_too_many(tiny_efficientnet, image_folder, tmp_path, local_ray):
    """The driver's data preparation (no training): the image folder's bad file is skipped and
    counted (what summary.json's bad_rows_skipped reports), and a fraction above the limit refused."""
    from raytune_ft.train.datasets import prepare_datasets
    from raytune_ft.train.planning import plan_run
    from raytune_ft.train.ray_start import init_ray

    recipe = validate_recipe(image_recipe(tiny_efficientnet, tmp_path / "run", train=str(image_folder), test=None, max_rows=None,
                                          validation_fraction=0.2, on_bad_rows="skip", max_bad_fraction=0.2))
    planned = plan_run(recipe)
    assert planned.labels == ["Bag", "Trouser"]
    init_ray(None, recipe)
    data = prepare_datasets(recipe, planned)
    assert sum(data.bad_rows.values()) == 1
    assert data.train_rows + data.datasets["validation"].count() == 24  # every good image, once

    recipe.data.max_bad_fraction = 0.0
    with pytest.raises(UserError, match=r"data.max_bad_fraction: 1 of \d+ rows of data.(train|validation) .* are bad"):
        prepare_datasets(recipe, planned)


def class_subset(path: Path, split: str, classes: list[str], count: int) -> Path:
    """The first ``count`` Fashion-MNIST rows of ``split`` in ``classes``, as parquet (image, label)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from raytune_ft.data import assets

    table = pads.dataset(assets.fashion_mnist(split)).to_table(filter=pads.field("label").isin(classes)).slice(0, count)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def three_class_cnn(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny EfficientNet trained here (no Ray) on three Fashion-MNIST classes, exported with its
    labels in a non-alphabetical order, and a reference set of those classes."""
    import pyarrow.parquet as pq

    from raytune_ft.models.efficientnet_lite import EfficientNetLite
    from raytune_ft.tasks.image_classification import decode_image, normalise, save_model

    root = tmp_path_factory.mktemp("three_class_cnn")
    labels = ["Trouser", "Bag", "Sneaker"]
    data = {"train": class_subset(root / "train.parquet", "train", labels, 480),
            "test": class_subset(root / "test.parquet", "test", labels, 96)}
    rows = pq.read_table(data["train"]).to_pylist()
    pixels = normalise(np.stack([decode_image(row["image"], 32) for row in rows]))
    targets = torch.tensor([labels.index(row["label"]) for row in rows])
    torch.manual_seed(0)
    model = EfficientNetLite({**TINY_EFFICIENTNET, "num_labels": 3, "labels": labels, "image_size": 32})
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(90):
        batch = torch.randint(0, len(rows), (32,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(pixels[batch]), targets[batch]).backward()
        optimizer.step()
    save_model(model.eval(), root / "model", {**TINY_EFFICIENTNET, "num_labels": 3, "labels": labels, "image_size": 32})
    return root / "model", data


def own_accuracy(model_dir: Path, data: Path) -> float:
    """The exported model's accuracy on ``data`` with its own head, computed here without raytune_ft's loop."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from raytune_ft.models.efficientnet_lite import EfficientNetLite
    from raytune_ft.tasks.image_classification import decode_image, normalise

    config = json.loads((model_dir / "config.json").read_text())
    model = EfficientNetLite(config)
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    rows = pq.read_table(data).to_pylist()
    with torch.no_grad():
        predicted = model.eval()(normalise(np.stack([decode_image(row["image"], 32) for row in rows]))).argmax(-1)
    return float((predicted == torch.tensor([config["labels"].index(row["label"]) for row in rows])).float().mean())


@pytest.fixture(scope="module")
def head_reference_runs(three_class_cnn, local_ray, tmp_path_factory) -> dict[str, dict]:
    """The three-class CNN fine-tuned on two other classes with a huge learning rate and a
    ``head`` reference, under DDP and under ZeRO-3: backend -> summary."""
    model_dir, reference = three_class_cnn
    summaries = {}
    for backend in ("ddp", "zero3"):
        directory = tmp_path_factory.mktemp(f"head_reference_{backend}")
        target = {split: class_subset(directory / f"{split}.parquet", split, ["Coat", "Dress"], 160) for split in ("train", "test")}
        recipe = image_recipe(model_dir, directory / "run", train=str(target["train"]), test=str(target["test"]), max_rows=None, validation_fraction=0.2)
        recipe["train"].update(lr=0.3, epochs=2, clip_grad_norm=None)
        if backend == "zero3":
            recipe["train"]["backend"], recipe["deepspeed"] = "deepspeed", {"zero_stage": 3}
        recipe["retention"] = {"references": [{"name": "original", "kind": "head", "data": {
            "train": str(reference["train"]), "test": str(reference["test"]), "columns": {"image": "image", "label": "label"}}}]}
        summaries[backend] = run(validate_recipe(recipe))
    return summaries


def test_head_reference_scores_the_original_head_and_sees_it_forget(three_class_cnn, head_reference_runs):
    """The ``head`` reference is the base model's own head on its own classes: before training
    exactly the exported model's accuracy, and it falls once a huge learning rate has moved the body."""
    model_dir, reference = three_class_cnn
    retention = head_reference_runs["ddp"]["retention"]
    base = own_accuracy(model_dir, reference["test"])
    assert base > 0.6  # three classes: chance is 1/3
    assert retention["before"]["ref/original/accuracy"] == pytest.approx(base, abs=1e-6)
    assert retention["after"]["ref/original/accuracy"] < base - 0.1
    assert retention["retention"]["retention/original/accuracy"] < 0.9


def test_head_reference_under_zero3_scores_like_ddp(head_reference_runs):
    """Under ZeRO-3 the head reference runs in lockstep on partitioned parameters; same seed,
    same scores: before training exactly, after within one of the 96 reference images (the
    trajectories differ in the order of floating-point sums, at a huge learning rate)."""
    zero3, ddp = head_reference_runs["zero3"]["retention"], head_reference_runs["ddp"]["retention"]
    assert head_reference_runs["zero3"]["backend"] == "deepspeed"
    assert zero3["before"] == pytest.approx(ddp["before"], abs=1e-9)
    assert zero3["after"] == pytest.approx(ddp["after"], abs=1 / 96 + 1e-9)


def test_head_reference_needs_a_model_with_its_own_labelled_head(tiny_efficientnet, three_class_cnn, tmp_path):
    from raytune_ft.addons.references import RetentionReferences

    _, reference = three_class_cnn
    head = {"references": [{"name": "original", "kind": "head", "data": {
        "train": str(reference["train"]), "test": str(reference["test"]), "columns": {"image": "image", "label": "label"}}}]}
    from raytune_ft.data import assets

    imagenet = validate_recipe({**image_recipe(assets.efficientnet_lite0(), tmp_path / "run"), "retention": head})
    with pytest.raises(UserError, match="model.path: .* has no classifier with named labels"):
        RetentionReferences.plan(imagenet, None, None)
    head["references"][0]["data"]["labels"] = ["Bag", "Sneaker", "Trouser"]
    renamed = validate_recipe({**image_recipe(three_class_cnn[0], tmp_path / "run"), "retention": head})
    with pytest.raises(UserError, match=r"retention.references.0.data.labels: a head reference reads the base model's labels \['Trouser', 'Bag', 'Sneaker'\]"):
        RetentionReferences.plan(renamed, None, None)

    text = validate_recipe({"name": "t", "task": {"type": "text_classification"}, "model": {"path": str(tmp_path)},
                            "data": {"train": str(reference["train"]), "columns": {"text": "label", "label": "label"}},
                            "retention": {"references": [{"name": "original", "kind": "head", "data": {
                                "train": str(reference["train"]), "columns": {"text": "label", "label": "label"}}}]}})
    with pytest.raises(UserError, match="retention.references.0.kind: head: the text_classification task keeps no original classifier head"):
        RetentionReferences.plan(text, None, None)


def test_lora_on_pointwise_convolutions_merges_into_plain_weights(tiny_efficientnet):
    """LoRA on a CNN's 1x1 convolutions: the base weights stay as they were, the merged export
    computes what the adapted model computes; a depthwise (3x3, grouped) target is refused. A
    search given no targets finds the pointwise ones."""
    from raytune_ft.strategies import adaptable_modules
    from raytune_ft.tasks import build_task

    recipe = validate_recipe(image_recipe(tiny_efficientnet, Path("unused")))
    task = build_task(recipe, ["a", "b", "c"])
    strategy = strategy_of({"method": "lora", "rank": 4, "target_modules": ["_project_conv", "_expand_conv"]})
    strategy.check(task.skeleton())
    assert adaptable_modules(task.skeleton()) == ["_expand_conv", "_project_conv"]  # what retention.floor's search adapts
    base = task.build_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = strategy.prepare(base, task)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    pixels, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        task.forward(model, {"pixels": pixels, "labels": labels})[0].backward()
        optimizer.step()
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()
                if "lora_" not in k and "classifier" not in k}
    assert all(torch.equal(before[k], v) for k, v in base_now.items() if k in before and "running" not in k and "num_batches" not in k)
    model.eval()
    with torch.no_grad():
        adapted = model(pixels)
        merged = strategy.export(model)
        assert torch.allclose(merged(pixels), adapted, atol=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in merged.state_dict().items() if "_project_conv" in k)

    with pytest.raises(UserError, match="strategy.target_modules: no Linear or 1x1 Conv2d module named _depthwise_conv"):
        strategy_of({"method": "lora", "target_modules": ["_depthwise_conv"]}).check(task.skeleton())
