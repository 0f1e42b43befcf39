"""Plots a person would rather look at than read: learning curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(path: Path, history: list[dict[str, Any]], title: str) -> Path:
    """Loss (train and eval) on the left, every other eval metric on the right, per epoch."""
    plt = _pyplot()
    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train/loss", "train/distill_kl", "eval/loss"):
        if all(key in record for record in history):
            loss_axis.plot(epochs, [record[key] for record in history], marker="o", label=key)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_title("loss")
    loss_axis.legend()
    keys = sorted({k for record in history for k in record if k.startswith(("eval/", "ref/", "retention/")) and k != "eval/loss" and not k.endswith("/count")})
    for key in keys:
        metric_axis.plot(epochs, [record.get(key) for record in history], marker="o", label=key)
    metric_axis.set_xlabel("epoch")
    metric_axis.set_title("metrics")
    if keys:
        metric_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def confusion_matrix(path: Path, confusion: list[list[int]], labels: list[str], title: str) -> Path:
    plt = _pyplot()
    size = max(4, 0.5 * len(labels) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(confusion, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.colorbar(image)
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_run_plots(directory: Path, history: list[dict[str, Any]], test: dict[str, Any], recipe) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if history:
        written.append(learning_curves(directory / "learning_curves.png", history, recipe.name))
    if isinstance(test.get("confusion"), dict):  # one per label role (multitask heads)
        for role, confusion in test["confusion"].items():
            written.append(confusion_matrix(directory / f"confusion_matrix_{role}.png", confusion, recipe.data.labels[role],
                                            f"{recipe.name}: test, {role}"))
    elif test.get("confusion"):
        labels = recipe.data.labels or [str(i) for i in range(len(test["confusion"]))]
        written.append(confusion_matrix(directory / "confusion_matrix.png", test["confusion"], labels, f"{recipe.name}: test"))
    return written


def trial_curves(path: Path, curves: dict[str, list[dict[str, Any]]], metrics: list[str]) -> Path:
    """Every trial's learning curve: one panel per searched metric, one line per trial."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for trial, history in curves.items():
            rows = [row for row in history if metric in row]
            axis.plot([row["epoch"] for row in rows], [row[metric] for row in rows], marker="o", label=trial)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def pareto_plot(path: Path, points: list[tuple[float, float]], front: list[int], labels: list[str], metrics: list[str]) -> Path:
    """All trials in the plane of the two objectives, the non-dominated front joined in red."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 5))
    axis.scatter([p[0] for p in points], [p[1] for p in points], color="tab:gray", label="trials")
    members = sorted((points[i], labels[i]) for i in front)
    axis.plot([p[0] for p, _ in members], [p[1] for p, _ in members], "o-", color="tab:red", label="Pareto front")
    for point, label in members:
        axis.annotate(label, point, textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.set_xlabel(metrics[0])
    axis.set_ylabel(metrics[1])
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
