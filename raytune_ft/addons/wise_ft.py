"""The ``wise_ft`` add-on. WiSE-FT (Wortsman et al. 2022): theta(a) = (1 - a) * theta_base +
a * theta_tuned, no retraining; after training, the best alpha on validation (among those that
keep ``min_retention``) is the exported model.

theta_base is the model when its body first trains: the pretrained body, and the head as it was
then. A head that was never trained before that point (a random init under ``full``) is not a
meaningful end point, so it stays tuned at every alpha; after a linear-probing phase (``lp_ft``,
``gradual``) the head is interpolated too, as in the paper. LoRA's A matrices stay tuned and only
B is interpolated, which scales the adapter's update by alpha exactly.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from raytune_ft.addons import AddOn, register
from raytune_ft.evaluation import evaluate, scalars
from raytune_ft.strategies import in_module

logger = logging.getLogger(__name__)

ANCHOR_FILE = "wise_ft_anchor.safetensors"  # in checkpoints, once the body trains: theta_base


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tuned.items():
        if key in base and "lora_A" not in key and value.is_floating_point():
            out[key] = torch.lerp(base[key].to(value.dtype), value, alpha)
        else:
            out[key] = value
    return out


def choose(rows: list[dict[str, Any]], metric: str, min_retention: float) -> dict[str, Any]:
    """The best target score among alphas whose retention is high enough; else the most retentive.
    Retention on the references' validation rows where they are scored (retention.floor), so
    that their test rows only report."""
    key = "retention_val/min" if any("retention_val/min" in row for row in rows) else "retention/min"
    eligible = [row for row in rows if row.get(key, 1.0) >= min_retention]
    if eligible:
        return max(eligible, key=lambda row: (row[metric], row["alpha"]))
    return max(rows, key=lambda row: (row.get(key, 1.0), row[metric]))


def body_trains(module: torch.nn.Module, heads: list[str]) -> bool:
    return any(p.requires_grad and not in_module(name, heads) for name, p in module.named_parameters())


@register
class WiseFT(AddOn):
    section = "wise_ft"

    def __init__(self, loop):
        super().__init__(loop)
        self.anchor: dict[str, torch.Tensor] | None = None

    def start_epoch(self, epoch, seed):
        """theta_base: the weights when the body starts training, without a never-trained head."""
        backend, heads = self.loop.backend, self.loop.heads
        if self.anchor is None and body_trains(backend.module, heads):
            self.anchor = {key: value for key, value in backend.snapshot().items() if epoch > 1 or not in_module(key, heads)}

    def save(self, directory, rank, final):
        from safetensors.torch import save_file

        if self.anchor is not None and not final and rank == 0:
            save_file(self.anchor, os.path.join(directory, ANCHOR_FILE))

    def load(self, directory):
        from safetensors.torch import load_file

        if os.path.exists(os.path.join(directory, ANCHOR_FILE)):
            self.anchor = load_file(os.path.join(directory, ANCHOR_FILE))

    def finish(self, state):
        """Score every alpha on validation and the references; keep the chosen alpha's weights."""
        if self.anchor is None:
            return
        loop, spec = self.loop, self.loop.recipe.wise_ft
        backend, references = loop.backend, loop.addons.get("retention")
        tuned = backend.snapshot()
        rows = []
        for alpha in spec.alphas:
            backend.restore(interpolate(self.anchor, tuned, alpha))
            row = {"alpha": alpha, **scalars("eval", evaluate(loop.task, backend.module, loop.shards.get("validation"), loop.eval_batch, backend))}
            if references:
                row.update(references.evaluate(backend))
            rows.append(row)
        chosen = choose(rows, spec.metric, spec.min_retention)
        backend.restore(interpolate(self.anchor, tuned, chosen["alpha"]))
        state["wise_ft"] = {"alpha": chosen["alpha"], "rows": rows}
        if loop.rank == 0:
            logger.info("WiSE-FT: alpha %s chosen", chosen["alpha"])

    @classmethod
    def summary(cls, recipe, state):
        return state.get("wise_ft")
