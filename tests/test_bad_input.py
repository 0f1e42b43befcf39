"""Bad input, tried systematically: recipes, data, models and the environment.

Every case runs the real command line in-process (``raytune_ft.cli.main``, so ~70 cases cost
seconds, not a Python start each) and must end with exit code 2, exactly one stderr line
``error: <field or file>: <what>``, no traceback, and nothing under the test's directory created,
changed or deleted. Ray is never started: every case fails in validation or pre-flight.
One case also goes through a real ``raytune-ft`` process.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import Payload, cli, snapshot, write_recipe
from raytune_ft.schema import set_field

DELETE = object()


def rows(*pairs):
    return pa.Table.from_pylist([{"sentence": s, "sentiment": l} for s, l in pairs])


def changed(changes: dict, expected: str):
    """A case that sets dotted recipe fields (``DELETE`` removes one) and expects ``expected``."""

    def case(recipe, tmp_path):
        for path, value in changes.items():
            if value is DELETE:
                *parents, key = path.split(".")
                node = recipe
                for parent in parents:
                    node = node[parent]
                del node[key]
            else:
                set_field(recipe, path, copy.deepcopy(value))
        return expected

    return case


LORA = {"strategy.method": "lora"}
DEEPSPEED = {"train.backend": "deepspeed"}
REFERENCE = {"retention": {"references": [{"name": "topics", "data": {"train": "x.parquet", "columns": {"text": "t", "label": "l"}}}]}}
TUNE = {"tune": {"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}}

RECIPE_CASES = {
    # unknown keys, at every depth
    "unknown_top_level_key": ({"trian": {"lr": 1}}, "r.yaml: trian: unknown field"),
    "unknown_key_in_section": ({"train.learning_rate": 1e-3}, "train.learning_rate: unknown field"),
    "unknown_key_depth_3": ({"train.early_stopping": {"metrc": "eval/loss"}}, "train.early_stopping.metrc: unknown field"),
    "unknown_key_in_reference_data": ({**REFERENCE, "retention.references.0.data.colums": {}}, "retention.references.0.data.colums: unknown field"),
    "unknown_task_option": ({"task.max_len": 64}, "task.max_len: unknown field"),
    "unknown_tune_dimension_key": ({"tune": {"space": {"train.lr": {"logunifrom": [1, 2]}}}}, "tune.space.train.lr.logunifrom: unknown field"),
    # wrong types
    "lr_not_a_number": ({"train.lr": "fast"}, "train.lr: Input should be a valid number"),
    "epochs_a_list": ({"train.epochs": [1, 2]}, "train.epochs: Input should be a valid integer"),
    "workers_a_word": ({"scaling.workers": "two"}, "scaling.workers: Input should be a valid integer"),
    "section_not_a_mapping": ({"train": 5}, "train: Input should be a valid dictionary"),
    "columns_a_list": ({"data.columns": ["sentence", "sentiment"]}, "data.columns: Input should be a valid dictionary"),
    "use_gpu_a_word": ({"scaling.use_gpu": "sometimes"}, "scaling.use_gpu: Input should be a valid boolean"),
    "missing_model_section": ({"model": DELETE}, "model: Field required"),
    "missing_task_type": ({"task.type": DELETE}, "task.type: Field required"),
    # out of range
    "negative_lr": ({"train.lr": -1}, "train.lr: Input should be greater than or equal to 0"),
    "zero_batch_size": ({"train.batch_size": 0}, "train.batch_size: Input should be greater than or equal to 1"),
    "validation_fraction_too_big": ({"data.validation_fraction": 0.7}, "data.validation_fraction: Input should be less than 0.5"),
    "dropout_one": ({"train.dropout": 1.0}, "train.dropout: Input should be less than 1"),
    "zero_stage_4": ({**DEEPSPEED, "deepspeed.zero_stage": 4}, "deepspeed.zero_stage: Input should be less than or equal to 3"),
    "max_rows_zero": ({"data.max_rows": 0}, "data.max_rows: Input should be greater than or equal to 1"),
    "checkpoints_to_keep_zero": ({"output.checkpoints_to_keep": 0}, "output.checkpoints_to_keep: Input should be greater than or equal to 1"),
    "bad_run_name": ({"name": "../escape"}, "name: String should match pattern"),
    "unknown_precision": ({"train.precision": "fp8"}, "train.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
    # cross-field conflicts
    "neither_epochs_nor_max_steps": ({"train.epochs": None}, "train.epochs: give epochs or max_steps"),
    "fractional_warmup_steps": ({"train.warmup": 2.5}, "train.warmup: a step count must be a whole number"),
    "unknown_task": ({"task.type": "summarise"}, "task.type: unknown task 'summarise'; allowed: causal_lm, image_classification, multitask, speech_recognition, text_classification, visual_question_answering"),
    "unknown_strategy": ({"strategy.method": "dora"}, "strategy.method: unknown 'dora'; allowed:"),
    "unknown_backend": ({"train.backend": "fsdp"}, "train.backend: unknown 'fsdp'; allowed: ddp, deepspeed"),
    "option_of_another_strategy": ({"strategy.rank": 4}, "strategy.rank: applies to method lora, not full"),
    "freeze_without_what": ({"strategy.method": "freeze"}, "strategy.layers: freeze needs layers"),
    "duplicate_labels": ({"data.labels": ["positive", "positive"]}, "data.labels: labels must be unique"),
    "ddp_fp16_weights": ({"model.dtype": "fp16"}, "model.dtype: fp16 weights need fp32 master weights"),
    "deepspeed_gradual_unfreezing": ({**DEEPSPEED, "strategy.method": "gradual"}, "strategy.method: gradual changes what trains mid-run"),
    "deepspeed_weights_in_another_dtype": ({**DEEPSPEED, "model.dtype": "bf16"}, "model.dtype: deepspeed keeps the weights in train.precision's dtype"),
    "deepspeed_offload_params_stage_2": ({**DEEPSPEED, "deepspeed.offload_params": "cpu"}, "deepspeed.offload_params: offloading parameters needs zero_stage 3"),
    "deepspeed_config_contradicts_recipe": ({**DEEPSPEED, "deepspeed.config": {"train_micro_batch_size_per_gpu": 99}},
                                            "deepspeed.config.train_micro_batch_size_per_gpu: 99 conflicts with train.batch_size"),
    "early_stopping_on_unreported_metric": ({"train.early_stopping": {"metric": "eval/bleu"}},
                                            "train.early_stopping.metric: 'eval/bleu' is not a metric task text_classification reports"),
    "early_stopping_bad_mode": ({"train.early_stopping": {"mode": "up"}}, "train.early_stopping.mode: Input should be 'min' or 'max'"),
    "wise_ft_unreported_metric": ({"wise_ft": {"metric": "eval/auc"}}, "wise_ft.metric: 'eval/auc' is not a metric"),
    "wise_ft_alpha_above_one": ({"wise_ft": {"alphas": [0.5, 1.5]}}, "wise_ft.alphas: every alpha must be in [0, 1]"),
    "ewc_without_reference": ({"regularizer": {"method": "ewc", "strength": 1.0}}, "regularizer: needs a retention reference"),
    "replay_unknown_reference": ({**REFERENCE, "replay": {"reference": "news"}}, "replay.reference: unknown reference 'news'"),
    "ewc_on_task_reference": ({**REFERENCE, "retention.references.0.kind": "task", "regularizer": {"method": "ewc", "strength": 1.0}},
                              "regularizer.reference: reference 'topics' is kind task; regularizer needs a probe or head reference"),
    "relative_storage_path": ({"output.storage_path": "shared/runs"}, "output.storage_path: give s3://BUCKET/PREFIX"),
    # tune section
    "tune_empty_space": ({"tune": {"space": {}}}, "tune.space: Dictionary should have at least 1 item"),
    "tune_two_distributions": ({"tune": {"space": {"train.lr": {"uniform": [0, 1], "choice": [1]}}}}, "tune.space.train.lr: give exactly one of"),
    "tune_loguniform_from_zero": ({"tune": {"space": {"train.lr": {"loguniform": [0, 1]}}}}, "tune.space.train.lr: loguniform low must be > 0"),
    "tune_pbt_batch_size": ({"tune": {"space": {"train.batch_size": {"choice": [8, 16]}}}, "tune.scheduler": "pbt"},
                            "tune.space: pbt continues one trial's run with another's hyperparameters"),
    "tune_pbt_deepspeed": ({**TUNE, "tune.scheduler": "pbt", "train.backend": "deepspeed"},
                           "tune.scheduler: pbt restarts trials with changed hyperparameters"),
    "tune_unknown_field": ({"tune": {"space": {"train.lrate": {"choice": [1e-3]}}}}, "tune.space.train.lrate: unknown field"),
    "tune_unsearchable_section": ({"tune": {"space": {"model.path": {"choice": ["a", "b"]}}}}, "tune.space.model.path: model cannot be searched"),
    "tune_three_metrics": ({**TUNE, "tune.metric": ["eval/loss", "eval/accuracy", "eval/macro_f1"]}, "tune.metric: one metric, or two different ones"),
    "tune_unreported_metric": ({**TUNE, "tune.metric": "eval/bleu"}, "tune.metric: 'eval/bleu' is not a metric"),
}


def case_yaml_syntax_error(recipe, tmp_path):
    (tmp_path / "r.yaml").write_text("name: tiny\ntask:\n  type: text_classification\n   max_length: 32\n")
    return "r.yaml: YAML syntax error at line 4"


def case_recipe_not_a_mapping(recipe, tmp_path):
    (tmp_path / "r.yaml").write_text("- task\n- model\n")
    return "r.yaml: a recipe must be a YAML mapping"


def case_recipe_file_missing(recipe, tmp_path):
    return "nope.yaml: recipe file not found", ["run", str(tmp_path / "nope.yaml")]


def case_set_without_value(recipe, tmp_path):
    return "--set: train.lr: expected FIELD=VALUE", ["--set", "train.lr"]


def case_set_below_a_value(recipe, tmp_path):
    return "--set: train.lr: is not a section", ["--set", "train.lr.peak=1"]


def case_zero_workers_option(recipe, tmp_path):
    return "scaling.workers: Input should be greater than or equal to 1", ["--workers", "0"]


# data
def case_missing_file(recipe, tmp_path):
    recipe["data"]["train"] = str(tmp_path / "nope.parquet")
    return "data.train: file not found", "nope.parquet"


def case_path_too_long_to_look_up(recipe, tmp_path):
    recipe["data"]["train"] = "x" * 300  # the OS refuses the lookup itself (ENAMETOOLONG): found by the property test
    return "data.train: cannot look up xxxxxxxx", "File name too long"


def case_missing_test_file(recipe, tmp_path):
    recipe["data"]["test"] = str(tmp_path / "gone" / "test.parquet")
    return "data.test: file not found"


def case_missing_column(recipe, tmp_path):
    recipe["data"]["columns"]["text"] = "review"
    return "data.columns.text: column 'review' not in", "columns: sentence, sentiment"


def case_validation_set_lacks_column(recipe, tmp_path):
    path = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "fine", "sentiment": "positive"}]), path)
    recipe["data"]["validation"] = str(path)
    return "data.columns.text: column 'sentence' not in", "validation.parquet"


def case_label_not_in_set(recipe, tmp_path):
    recipe["data"]["labels"] = ["negative", "positive"]
    path = tmp_path / "odd.parquet"
    pq.write_table(rows(("fine", "positive"), ("meh", "neutral")), path)
    recipe["data"]["test"] = str(path)
    return "data.test: row 1: label 'neutral' is not in the label set", "data.labels"


def case_missing_label(recipe, tmp_path):
    path = tmp_path / "holes.parquet"
    pq.write_table(rows(("fine", "positive"), ("meh", None)), path)
    recipe["data"]["test"] = str(path)
    return "data.test:", "holes.parquet: row 1: column 'sentiment' (label) is null", "data.on_bad_rows: skip"


def case_empty(recipe, tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(rows(("x", "positive")).slice(0, 0), path)
    recipe["data"]["train"] = str(path)
    return "data.train:", "has no rows"


def case_unreadable(recipe, tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    recipe["data"]["train"] = str(path)
    return "broken.parquet: cannot read as parquet"


def case_truncated_parquet(recipe, tmp_path):
    path = tmp_path / "cut.parquet"
    whole = Path(recipe["data"]["train"]).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    recipe["data"]["train"] = str(path)
    return "cut.parquet: cannot read as parquet"


def case_empty_csv(recipe, tmp_path):
    (tmp_path / "train.csv").write_text("")
    recipe["data"]["train"] = str(tmp_path / "train.csv")
    return "train.csv: cannot read as csv"


def case_unknown_format(recipe, tmp_path):
    (tmp_path / "train.txt").write_text("great,positive\n")
    recipe["data"]["train"] = str(tmp_path / "train.txt")
    return "train.txt: cannot tell the data format", "set data.format"


def case_folder_without_data(recipe, tmp_path):
    (tmp_path / "shards").mkdir()
    recipe["data"]["train"] = str(tmp_path / "shards")
    return "shards: cannot tell the data format"


def case_one_label(recipe, tmp_path):
    path = tmp_path / "one.parquet"
    pq.write_table(rows(("good", "positive"), ("great", "positive")), path)
    recipe["data"]["train"] = str(path)
    return "data.columns.label:", "fewer than 2 distinct labels"


def case_unknown_data_asset(recipe, tmp_path):
    recipe["data"]["train"] = "asset:imdb"
    return "data.train: unknown asset 'imdb'"


def case_reference_data_missing(recipe, tmp_path):
    recipe["retention"] = {"references": [{"name": "topics", "data": {
        "train": str(tmp_path / "topics.parquet"), "columns": {"text": "text", "label": "topic"}}}]}
    return "retention.references.0.data.train: file not found"


# models
def copy_model(recipe, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(recipe["model"]["path"], model)
    recipe["model"]["path"] = str(model)
    return model


def case_model_directory_missing(recipe, tmp_path):
    recipe["model"]["path"] = str(tmp_path / "no_such_model")
    return "model.path: directory not found", "no_such_model"


def case_model_directory_empty(recipe, tmp_path):
    (tmp_path / "empty_model").mkdir()
    recipe["model"]["path"] = str(tmp_path / "empty_model")
    return "model.path:", "is not a usable model directory"


def case_model_config_not_json(recipe, tmp_path):
    (copy_model(recipe, tmp_path) / "config.json").write_text("{\"model_type\": ")
    return "model.path:", "is not a usable model directory"


def case_model_without_weights(recipe, tmp_path):
    (copy_model(recipe, tmp_path) / "model.safetensors").unlink()
    return "model.path: no weights (model.safetensors) in"


def case_model_truncated_weights(recipe, tmp_path):
    weights = copy_model(recipe, tmp_path) / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 1000])
    return "model.path:", "model.safetensors: cannot read the weights (incomplete"


def case_model_weights_not_safetensors(recipe, tmp_path):
    (copy_model(recipe, tmp_path) / "model.safetensors").write_bytes(b"\x00" * 64)
    return "model.path:", "model.safetensors: cannot read the weights (not a safetensors file"


def case_model_weights_wrong_shapes(recipe, tmp_path):
    config = copy_model(recipe, tmp_path) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 48}))
    return "model.path:", "model.safetensors: tensor ", "has shape [32], but the model's config.json gives [48]"


def case_model_weights_of_another_model(recipe, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"h.0.attn.c_attn.weight": torch.zeros(2, 2)}, copy_model(recipe, tmp_path) / "model.safetensors")
    return "model.path: none of the tensors in", "belong to a BertForSequenceClassification"


def case_model_wrong_architecture(recipe, tmp_path):
    from transformers import ViTConfig

    config = copy_model(recipe, tmp_path) / "config.json"
    config.write_text(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).to_json_string())
    return "model.path: a vit model cannot do text_classification"


def case_unknown_model_asset(recipe, tmp_path):
    recipe["model"]["path"] = "asset:gpt-17"
    return "model.path: unknown asset 'gpt-17'", "available:"


def as_vqa(recipe, image_encoder: str) -> None:
    """The tiny recipe as visual question answering (its sentences stand in for both inputs)."""
    recipe["task"] = {"type": "visual_question_answering", "image_encoder": image_encoder, "fusion": "cross_attention"}
    recipe["data"]["columns"] = {"image": "sentence", "question": "sentence", "label": "sentiment"}


def case_vqa_image_encoder_missing(recipe, tmp_path):
    as_vqa(recipe, str(tmp_path / "lite0.pth"))
    return "task.image_encoder: not found:", "lite0.pth"


def case_vqa_image_encoder_is_a_text_model(recipe, tmp_path):
    as_vqa(recipe, recipe["model"]["path"])
    return "task.image_encoder:", "config.json: architecture None is not efficientnet_lite"


def case_vqa_attention_heads_do_not_divide_the_width(recipe, tmp_path):
    as_vqa(recipe, "asset:efficientnet-lite0")
    recipe["task"]["attention_heads"] = 5
    return "task.attention_heads: 5 does not divide the text encoder's width 32"


def case_max_length_too_long(recipe, tmp_path):
    recipe["task"]["max_length"] = 4096
    return "task.max_length: 4096 exceeds the model's 128 positions"


def case_freeze_more_layers_than_the_model_has(recipe, tmp_path):
    recipe["strategy"] = {"method": "freeze", "layers": 9}
    return "strategy.layers: 9 layers to freeze, but the model has 2"


def case_freeze_unknown_module(recipe, tmp_path):
    recipe["strategy"] = {"method": "freeze", "modules": ["decoder"]}
    return "strategy.modules: no module named 'decoder'"


def case_lora_targets_match_nothing(recipe, tmp_path):
    recipe["strategy"] = {"method": "lora", "target_modules": ["q_proj", "v_proj"]}
    return "strategy.target_modules: no Linear or 1x1 Conv2d module named q_proj, v_proj in BertForSequenceClassification", "candidates:"


# environment
def occupied_run(recipe) -> Path:
    run_dir = Path(recipe["output"]["dir"])
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"precious": true}')
    return run_dir


def case_existing_run_without_resume(recipe, tmp_path):
    occupied_run(recipe)
    return "output.dir:", "already holds a run; pass --resume to continue it or --force"


def case_resume_and_force(recipe, tmp_path):
    occupied_run(recipe)
    return "--force: cannot be combined with --resume", ["--resume", "--force"]


def case_resume_without_a_run(recipe, tmp_path):
    return "--resume: no run to resume in", ["--resume"]


def case_resume_from_a_damaged_snapshot(recipe, tmp_path):
    (occupied_run(recipe) / "summary.json").unlink()
    (Path(recipe["output"]["dir"]) / "checkpoint_manager_snapshot.json").write_text("[not")
    return "--resume:", "checkpoint_manager_snapshot.json: not Ray Train's run snapshot", ["--resume"]


def case_output_dir_below_a_file(recipe, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    recipe["output"]["dir"] = str(tmp_path / "a_file" / "run")
    return "output.dir:", "is not writable"


def case_ray_address_unreachable(recipe, tmp_path):
    with socket.socket() as closed_port:  # bound but never listening: connections to it are refused
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
    return f"--address: cannot reach Ray at 127.0.0.1:{port}", ["--address", f"127.0.0.1:{port}"]


CASES = [pytest.param(changed(*spec), id=name) for name, spec in RECIPE_CASES.items()] + [
    pytest.param(case, id=name[5:]) for name, case in list(globals().items()) if name.startswith("case_")
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_harmless(case, tiny_recipe, tmp_path, cli_in_process):
    expected = case(tiny_recipe, tmp_path)
    expected = [expected] if isinstance(expected, str) else list(expected)
    extra = expected.pop() if isinstance(expected[-1], list) else []
    recipe_path = tmp_path / "r.yaml"
    if not recipe_path.exists():
        write_recipe(tiny_recipe, recipe_path)
    args = extra if extra[:1] == ["run"] else ["run", str(recipe_path), *extra]
    before = snapshot(tmp_path)
    code, stderr = cli_in_process(*args)
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert all(part in lines[0] for part in expected), lines[0]
    assert snapshot(tmp_path) == before  # nothing created, changed or deleted


def test_cases_cover_every_area():
    assert len(CASES) >= 40


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_pickled_model_weights_are_refused_unrun(weights, tiny_recipe, tmp_path, cli_in_process):
    """A pickle whose unpickling would run code, where model weights are expected, is never loaded."""
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(Payload(armed)))
    assert armed.exists()  # the payload works: loading it runs code
    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    shutil.copytree(tiny_recipe["model"]["path"], model, ignore=shutil.ignore_patterns("model.safetensors"))
    (model / weights).write_bytes(pickle.dumps(Payload(marker)))
    tiny_recipe["model"]["path"] = str(model)
    code, stderr = cli_in_process("run", str(write_recipe(tiny_recipe, tmp_path / "r.yaml")))
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert {"pytorch_model.bin": "has only pickle weights (pytorch_model.bin), which are never loaded",
            "model.safetensors": "model.safetensors: cannot read the weights (not a safetensors file)"}[weights] in stderr
    assert not marker.exists()


def test_real_command_line_prints_one_line(tiny_recipe, tmp_path):
    """The same contract through a real ``raytune-ft`` process (library warnings included)."""
    tiny_recipe["data"]["columns"]["label"] = "stars"
    result = cli("run", str(write_recipe(tiny_recipe, tmp_path / "r.yaml")))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: data.columns.label: column 'stars' not in {tiny_recipe['data']['train']}; "
                                          "columns: sentence, sentiment"], result.stderr
    assert not Path(tiny_recipe["output"]["dir"]).exists()
