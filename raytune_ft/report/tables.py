"""The short table a run ends with."""

from __future__ import annotations

from typing import Any


def summary_table(summary: dict[str, Any]) -> str:
    target = summary.get("test") or summary.get("eval") or {}
    base = summary.get("baseline") or {}
    split = "test" if summary.get("test") else "validation"
    rows = [("metric", "base model (head only)", "fine-tuned", "gain")]
    for key in ("accuracy", "macro_f1"):
        if key in target:
            before = base.get(key)
            rows.append((f"{split} {key}", f"{before:.4f}" if before is not None else "-", f"{target[key]:.4f}",
                         f"{target[key] - before:+.4f}" if before is not None else "-"))
    retention = summary.get("retention")
    if retention:
        for key, before in retention["before"].items():
            after = retention["after"][key]
            rows.append((f"{key} (reference)", f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}"))
    width = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    outputs = summary["outputs"]
    lines += [
        "",
        f"time {summary['wall_time_s']:.0f} s (training {summary['train_time_s']:.0f} s), "
        f"{summary['train_samples_per_s']:.1f} samples/s, data wait {summary['data_wait_fraction']:.1%}, "
        f"{summary['epochs']} epochs / {summary['steps']} steps on {summary['workers']} workers ({summary['backend']})",
        *retention_lines(summary),
        *distill_lines(summary),
        f"outputs: {outputs['run_dir']}  (model/, metrics.jsonl, summary.json, plots/)",
    ]
    return "\n".join(lines)


def retention_lines(summary: dict[str, Any]) -> list[str]:
    retention, wise = summary.get("retention"), summary.get("wise_ft")
    lines = []
    if retention:
        ratios = ", ".join(f"{k.removeprefix('retention/')} {v:.3f}" for k, v in retention["retention"].items() if k != "retention/min")
        lines.append(f"retention (after / before): {ratios}; worst during the run {retention['worst_during_run']:.3f}; "
                     f"reference evaluation {retention['reference_eval_time_s']:.0f} s")
    if wise:
        lines.append(f"WiSE-FT: exported alpha {wise['alpha']} of {[row['alpha'] for row in wise['rows']]}")
    return lines


def distill_lines(summary: dict[str, Any]) -> list[str]:
    distill = summary.get("distill")
    if not distill:
        return []
    teacher, student = distill["teacher"], distill["student"]
    scores = ", ".join(f"{key} {student['test'][key]:.4f} vs teacher {teacher['test'][key]:.4f} ({delta:+.4f})"
                       for key, delta in distill["delta"].items())
    return [f"distillation (T {distill['temperature']}, alpha {distill['alpha']}): student {student['parameters'] / 1e6:.2f}M "
            f"parameters, teacher {teacher['parameters'] / 1e6:.2f}M ({distill['size_ratio']:.1f}x); test {scores or '-'}"]
