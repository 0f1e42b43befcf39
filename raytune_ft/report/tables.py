"""The short table a run ends with, and the other tables the command line prints (rich)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


def plural(count: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def render(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """Plain text (no colour, no frame): a header, a rule, the rows; columns in ``right`` aligned
    right. Wide enough never to wrap: the text goes to logs as often as to terminals."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for index, name in enumerate(header):
        table.add_column(name, justify="right" if index in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(width=1000, no_color=True, highlight=False, emoji=False, markup=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def summary_table(summary: dict[str, Any]) -> str:
    target = summary.get("test") or summary.get("eval") or {}
    base = summary.get("baseline") or {}
    split = "test" if summary.get("test") else "validation"
    rows = []
    per_head = [key for key in target if key.endswith(("_accuracy", "_macro_f1"))]  # multitask: <head>_accuracy, ...
    for key in ("accuracy", "macro_f1", *per_head):
        if key in target:
            before = base.get(key)
            rows.append([f"{split} {key}", f"{before:.4f}" if before is not None else "-", f"{target[key]:.4f}",
                         f"{target[key] - before:+.4f}" if before is not None else "-"])
    retention = summary.get("retention")
    if retention:
        for key, before in retention["before"].items():
            after = retention["after"][key]
            rows.append([f"{key} (reference)", f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}"])
    outputs = summary["outputs"]
    lines = [
        render(["metric", "base model (head only)", "fine-tuned", "gain"], rows, right=(1, 2, 3)),
        "",
        f"time {summary['wall_time_s']:.0f} s (training {summary['train_time_s']:.0f} s), "
        f"{summary['train_samples_per_s']:.1f} samples/s, data wait {summary['data_wait_fraction']:.1%}, "
        f"{summary['epochs']} epochs / {summary['steps']} steps on {plural(summary['workers'], 'worker')} ({summary['backend']})",
        *retention_lines(summary),
        *distill_lines(summary),
        *post_lines(summary),
        f"outputs: {outputs['run_dir']}  (model/, metrics.jsonl, summary.json, plots/{', post/' if summary.get('post') else ''})",
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
    if summary.get("floor"):
        lines.append(f"retention floor {summary['floor']['message']} (the front: floor.json, plots/floor.png)")
    return lines


def post_lines(summary: dict[str, Any]) -> list[str]:
    """One line per compression step the run ended with (``summary["post"]``): what it saved, what it cost."""
    post = summary.get("post") or {}
    lines = []
    if post.get("quantize"):
        quantize = post["quantize"]
        before, after = quantize["table"]
        lines.append(f"quantize (int8, {quantize['layers']} Linear layers): size {before['size_mb']:.1f} -> {after['size_mb']:.1f} MB, "
                     f"CPU latency {before['latency_ms']:.0f} -> {after['latency_ms']:.0f} ms/batch (1 thread), "
                     f"test accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f} ({quantize['accuracy_delta']:+.4f})")
    if post.get("prune"):
        prune = post["prune"]
        stages = " -> ".join(f"{row['accuracy']:.4f}" for row in prune["table"])
        lines.append(f"prune ({prune['scope']}, {prune['layers']} layers): {prune['sparsity_pruned']:.1%} of their weights zero "
                     f"({prune['sparsity_all']:.1%} of all parameters), test accuracy {stages} "
                     f"(fine-tuned -> pruned{' -> after ' + str(prune['finetune_steps']) + ' steps' if prune['finetune_steps'] else ''})")
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
