"""Checkpoint files hold tensors in safetensors and structure in JSON: nothing is unpickled."""

from __future__ import annotations

import torch

from raytune_ft.train.checkpoint import load_state, save_state


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
