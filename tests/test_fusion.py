"""Ensembles and model soups of real finished runs: a tiny tune experiment (three 1-worker,
2-epoch trials of one tiny BERT init at three learning rates, run at once) fused through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli, run_in_fixture, snapshot, tiny_recipe_dict
from raytune_ft.post.finished import FinishedRun
from raytune_ft.post.fusion import average_weights, fuse, majority_vote


@pytest.fixture(scope="module")
def experiment(tiny_bert, sentiment_data, tmp_path_factory, local_ray) -> Path:
    from raytune_ft.recipe import validate_recipe
    from raytune_ft.search.experiment import run_experiment

    directory = tmp_path_factory.mktemp("fusion") / "experiment"
    recipe = tiny_recipe_dict(tiny_bert, sentiment_data, directory)
    recipe["train"]["epochs"] = 2
    # Two learning rates too small to leave the majority class in 2 epochs, one that learns the task.
    recipe["tune"] = {"searcher": "grid", "num_samples": 1, "space": {"train.lr": {"grid": [2e-4, 5e-4, 1e-3]}},
                      "workers_per_trial": 1, "max_concurrent_trials": 3}
    run_in_fixture(lambda force: run_experiment(validate_recipe(recipe), force=force))
    return directory


def trial_runs(experiment: Path) -> dict[str, Path]:
    return {path.parent.name: path for path in sorted(experiment.glob("trials/*/run")) if (path / "summary.json").is_file()}


@pytest.fixture(scope="module")
def fused(experiment, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("fused") / "fusion"
    result = cli("fuse", "--tune", str(experiment), "--top", "3", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ensemble: majority vote" in result.stdout and "greedy soup" in result.stdout
    return output


def copy_as(run_dir: Path, destination: Path) -> Path:
    return Path(shutil.copytree(run_dir, destination, ignore=shutil.ignore_patterns("checkpoint_*")))


def test_members_ensembles_and_soups_land_in_fusion_json(fused, experiment):
    result = json.loads((fused / "fusion.json").read_text())
    summary = json.loads((experiment / "summary.json").read_text())
    ranked = sorted(summary["rows"], key=lambda row: row["eval/accuracy"], reverse=True)
    assert [member["name"] for member in result["members"]] == [row["trial"] for row in ranked]
    runs = trial_runs(experiment)
    for member in result["members"]:  # each member scores as its own run did: same rows, same model
        recorded = json.loads((runs[member["name"]] / "summary.json").read_text())["test"]
        assert member["test"]["accuracy"] == recorded["accuracy"] and member["test"]["macro_f1"] == recorded["macro_f1"]
        assert member["trained_on_this_data"]
    for kind in ("average", "vote"):
        for split in ("validation", "test"):
            scores = result["ensembles"][kind][split]
            assert 0 <= scores["accuracy"] <= 1 and scores["count"] == result["data"][split]
    assert result["ensembles"]["vote"]["test"]["loss"] is None and result["ensembles"]["average"]["test"]["loss"] > 0

    greedy, uniform = result["soups"]["greedy"], result["soups"]["uniform"]
    best = max(member["validation"]["accuracy"] for member in result["members"])
    assert greedy["validation"]["accuracy"] >= best
    assert greedy["members"][0] == result["members"][0]["name"] and [step["add"] for step in greedy["steps"]] == uniform["members"]
    first = FinishedRun.open(runs[result["members"][0]["name"]])
    for kind in ("uniform", "greedy"):  # the saved soups are the ones scored
        model = first.load_model(fused / f"{kind}_soup")
        assert first.evaluate(model, "test")["accuracy"] == result["soups"][kind]["test"]["accuracy"]
    table = (fused / "fusion.md").read_text()
    assert table.count("| member ") == 3 and "| ensemble: average of probabilities | all |" in table


def test_uniform_soup_is_the_mean_of_the_members(fused, experiment):
    runs = trial_runs(experiment)
    names = [member["name"] for member in json.loads((fused / "fusion.json").read_text())["members"]]
    first = FinishedRun.open(runs[names[0]])
    states = [FinishedRun.open(runs[name]).load_model().state_dict() for name in names]
    soup = first.load_model(fused / "uniform_soup").state_dict()
    assert soup.keys() == states[0].keys()
    for key, value in soup.items():
        torch.testing.assert_close(value, torch.stack([state[key] for state in states]).mean(0), rtol=1e-6, atol=1e-7)
    assert not torch.equal(soup["classifier.weight"], states[0]["classifier.weight"])


def test_integer_buffers_come_from_the_first_member():
    states = [{"weight": torch.tensor([1.0, 2.0]), "position_ids": torch.tensor([0, 1])},
              {"weight": torch.tensor([3.0, 5.0]), "position_ids": torch.tensor([7, 9])}]
    soup = average_weights(states)
    assert torch.equal(soup["weight"], torch.tensor([2.0, 3.5])) and torch.equal(soup["position_ids"], torch.tensor([0, 1]))


def test_majority_vote_breaks_ties_by_summed_probability():
    probabilities = [torch.tensor([[0.6, 0.4, 0.0], [0.5, 0.3, 0.2]]),
                     torch.tensor([[0.1, 0.9, 0.0], [0.1, 0.3, 0.6]]),
                     torch.tensor([[0.2, 0.8, 0.0], [0.4, 0.35, 0.25]])]
    # row 0: two votes for class 1; row 1: one vote each for 0 and 2 (0 twice), 0 wins 2 to 1
    assert majority_vote(probabilities).tolist() == [1, 0]
    tie = [torch.tensor([[0.55, 0.45]]), torch.tensor([[0.1, 0.9]])]  # one vote each: summed 0.65 vs 1.35
    assert majority_vote(tie).tolist() == [1]


def test_identical_members_fuse_to_the_member(experiment, tmp_path):
    best = json.loads((experiment / "summary.json").read_text())["best"]["trial"]
    run_dir = trial_runs(experiment)[best]
    copies = [copy_as(run_dir, tmp_path / name) for name in ("a", "b", "c")]
    result = fuse(copies, tmp_path / "out")
    run = FinishedRun.open(copies[0])
    member = result["members"][0]
    logits, _ = run.predict(run.load_model(), "test")
    for kind in ("uniform", "greedy"):
        soup_logits, _ = run.predict(run.load_model(tmp_path / "out" / f"{kind}_soup"), "test")
        assert torch.equal(soup_logits, logits), kind
    assert result["soups"]["greedy"]["members"] == ["a", "b", "c"]
    for kind in ("average", "vote"):
        for split in ("validation", "test"):
            ensemble = result["ensembles"][kind][split]
            assert ensemble["confusion"] == member[split]["confusion"] and ensemble["macro_f1"] == member[split]["macro_f1"]
    assert result["ensembles"]["average"]["test"]["loss"] == pytest.approx(member["test"]["loss"], rel=1e-5)


def wider_model(run_dir: Path, tiny_bert: Path) -> Path:
    """The run with its model replaced by a 48-wide BERT of the same labels: another architecture."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, num_labels=2)
    shutil.rmtree(run_dir / "model")
    BertForSequenceClassification(config).save_pretrained(run_dir / "model")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(run_dir / "model")
    return run_dir


def test_incompatible_runs_are_refused_in_one_line(experiment, tiny_bert, tmp_path, cli_in_process):
    first, second = list(trial_runs(experiment).values())[:2]
    relabelled = copy_as(second, tmp_path / "relabelled")
    recipe = relabelled / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("  - negative\n  - positive\n", "  - positive\n  - negative\n"))
    wider = wider_model(copy_as(second, tmp_path / "wider"), tiny_bert)
    before = snapshot(tmp_path)
    code, stderr = cli_in_process("fuse", str(first), str(relabelled), "--output", str(tmp_path / "out"))
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith(f"error: {relabelled}: labels ['positive', 'negative'] differ from ['negative', 'positive']")
    code, stderr = cli_in_process("fuse", str(first), str(wider), "--output", str(tmp_path / "out"))
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith(f"error: {wider / 'model'}: a different architecture") and "--no-soups" in stderr
    assert snapshot(tmp_path) == before
    # An ensemble needs no shared architecture.
    result = fuse([first, wider], tmp_path / "out", with_soups=False)
    assert "soups" not in result and not (tmp_path / "out" / "uniform_soup").exists()
    assert result["ensembles"]["average"]["test"]["count"] == result["members"][1]["test"]["count"] > 0


def test_an_existing_output_is_kept_unless_forced(experiment, tmp_path, cli_in_process):
    first, second = list(trial_runs(experiment).values())[:2]
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("keep me")
    before = snapshot(tmp_path)
    code, stderr = cli_in_process("fuse", str(first), str(second), "--output", str(output))
    assert (code, stderr) == (2, f"error: --output: {output} already exists; pass --force to move it aside\n")
    assert snapshot(tmp_path) == before
    fuse([first, second], output, force=True)
    (aside,) = tmp_path.glob("out.old-*")
    assert (aside / "mine.txt").read_text() == "keep me" and (output / "fusion.json").is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_bad_member_lists_are_one_line_errors(experiment, tmp_path, cli_in_process):
    first, second = list(trial_runs(experiment).values())[:2]
    out = str(tmp_path / "out")
    cases = [
        ((str(first), "--output", out), "error: fuse: 1 run given; fusion needs at least 2"),
        ((str(first), str(first), "--output", out), f"error: {first}: given twice"),
        ((str(first), "--top", "2", "--output", out), "error: --top: counts the trials of a tune experiment"),
        (("--tune", str(experiment), "--top", "4", "--output", out), f"error: --top: 4 trials asked for, but {experiment} has 3"),
        (("--tune", str(first), "--output", out), f"error: {first / 'summary.json'}: not a tune experiment's summary"),
        (("--tune", str(tmp_path), "--output", out), f"error: --tune: {tmp_path} holds no finished tune experiment"),
        ((str(first), str(tmp_path), "--output", out), f"error: {tmp_path / 'recipe.yaml'}: missing"),
    ]
    for args, expected in cases:
        code, stderr = cli_in_process("fuse", *args)
        assert code == 2 and stderr.startswith(expected) and stderr.count("\n") == 1, (args, stderr)
    assert not (tmp_path / "out").exists()
