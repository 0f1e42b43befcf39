"""Checkpoint files hold tensors in safetensors and structure in JSON: nothing is unpickled;
a checkpoint missing a file or holding a truncated one is named before anything resumes from it."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import Payload
from raytune_ft.checkpoint import load_state, save_state, verify_checkpoint
from raytune_ft.run_folder import write_text_atomic


def test_optimizer_state_round_trips(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    save_state({"optimizer": optimizer.state_dict(), "note": (1, "a", None)}, tmp_path, "state")
    restored = load_state(tmp_path, "state")
    assert restored["note"] == (1, "a", None)
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    fresh.load_state_dict(restored["optimizer"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(fresh.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def whole_checkpoint(directory):
    model = torch.nn.Linear(4, 3)
    save_state({"optimizer": torch.optim.AdamW(model.parameters()).state_dict()}, directory, "optimizer")
    save_file(model.state_dict(), directory / "weights.safetensors")
    (directory / "trainer_state.json").write_text(json.dumps({"epoch": 1}))
    torch.save({"shard": torch.zeros(3)}, directory / "zero_shard.pt")  # DeepSpeed's files are torch zips
    return directory


def cut(path, keep=-10):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage, problem", [
    (lambda d: cut(d / "weights.safetensors"), "weights.safetensors: incomplete"),
    (lambda d: (d / "weights.safetensors").write_bytes(pickle.dumps(Payload(d / "pwned"))), "weights.safetensors: not a safetensors file"),
    (lambda d: cut(d / "optimizer.json"), "optimizer.json:"),
    (lambda d: cut(d / "zero_shard.pt"), "zero_shard.pt:"),
    (lambda d: (d / "trainer_state.json").unlink(), "trainer_state.json: missing"),
])
def test_a_damaged_checkpoint_is_named(damage, problem, tmp_path):
    verify_checkpoint(whole_checkpoint(tmp_path))  # whole: no error
    damage(tmp_path)
    with pytest.raises(ValueError, match=problem):
        verify_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_atomic_write_leaves_whole_files_only(tmp_path):
    write_text_atomic(tmp_path / "summary.json", "{}")
    write_text_atomic(tmp_path / "summary.json", '{"done": true}')
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"done": True}


EXPORT_WITHOUT_DEEPSPEED = """
import sys
from transformers import BertConfig, BertForSequenceClassification
from raytune_ft.tasks import unwrapping_without_importing_deepspeed
config = BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
with unwrapping_without_importing_deepspeed():
    BertForSequenceClassification(config).save_pretrained(sys.argv[1])
assert "deepspeed" not in sys.modules, "the export imported deepspeed"
"""


def test_a_non_deepspeed_export_does_not_import_deepspeed(tmp_path):
    """transformers' save_pretrained would import deepspeed (installed here) to test for its engine."""
    result = subprocess.run([sys.executable, "-c", EXPORT_WITHOUT_DEEPSPEED, str(tmp_path / "model")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
