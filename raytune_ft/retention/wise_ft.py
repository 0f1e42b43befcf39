"""WiSE-FT (Wortsman et al. 2022): theta(a) = (1 - a) * theta_base + a * theta_tuned, no retraining.

theta_base is the model when its body first trains: the pretrained body, and the head as it was
then. A head that was never trained before that point (a random init under ``full``) is not a
meaningful end point, so it stays tuned at every alpha; after a linear-probing phase (``lp_ft``,
``gradual``) the head is interpolated too, as in the paper. LoRA's A matrices stay tuned and only
B is interpolated, which scales the adapter's update by alpha exactly.
"""

from __future__ import annotations

from typing import Any

import torch


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tuned.items():
        if key in base and "lora_A" not in key and value.is_floating_point():
            out[key] = torch.lerp(base[key].to(value.dtype), value, alpha)
        else:
            out[key] = value
    return out


def choose(rows: list[dict[str, Any]], metric: str, min_retention: float) -> dict[str, Any]:
    """The best target score among alphas whose retention is high enough; else the most retentive."""
    eligible = [row for row in rows if row.get("retention/min", 1.0) >= min_retention]
    if eligible:
        return max(eligible, key=lambda row: (row[metric], row["alpha"]))
    return max(rows, key=lambda row: (row.get("retention/min", 1.0), row[metric]))
