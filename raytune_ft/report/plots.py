"""Plots a person would rather look at than read: learning curves, gain vs retention, the
confusion matrix; a tune experiment's trial curves and Pareto front."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# The panels of learning_curves.png, each with one unit: (title, y label, which history keys).
PANELS = [
    ("loss", "loss", lambda key: key.startswith(("train/", "eval/")) and key.endswith("loss") or key == "train/distill_kl"),
    ("perplexity (validation)", "perplexity", lambda key: key == "eval/perplexity"),
    ("target task (validation)", "score", lambda key: key.startswith("eval/") and not key.endswith(("loss", "count", "perplexity", "log_variance"))),
    ("training throughput", "samples / s", lambda key: key == "train/samples_per_s"),
    ("reference tasks", "score", lambda key: key.startswith("ref/") and key != "ref/time_s"),
    ("retention (after / before)", "ratio", lambda key: key.startswith("retention/")),
    ("reference evaluation time", "seconds", lambda key: key == "ref/time_s"),
]


def curve_panels(history: list[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(title, unit, keys) of every panel that has data in ``history``."""
    keys = list(dict.fromkeys(key for record in history for key in record))
    panels = [(name, unit, [key for key in keys if wanted(key)]) for name, unit, wanted in PANELS]
    return [panel for panel in panels if panel[2]]


def learning_curves(path: Path, history: list[dict[str, Any]], title: str, before: dict[str, float] | None = None) -> Path:
    """One panel per unit, per epoch: losses, the target task's scores, throughput, the reference
    tasks' scores (dashed: before training, ``before``), retention ratios (dotted: 1, nothing
    lost) and the reference evaluations' time. Panels without data are left out."""
    plt = _pyplot()
    epochs = [record["epoch"] for record in history]
    panels = curve_panels(history)
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis, (name, unit, panel_keys) in zip(axes.flat, panels):
        for key in panel_keys:
            line, = axis.plot(epochs, [record.get(key) for record in history], marker="o", label=key)
            if before and key in before:
                axis.axhline(before[key], color=line.get_color(), linestyle="--", linewidth=1, label=f"{key} before training")
        if name.startswith("retention"):
            axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        values = [record[key] for record in history for key in panel_keys if record.get(key) is not None]
        if unit in ("score", "ratio") and values and 0 <= min(values) and max(values) <= 1:
            axis.set_ylim(0, 1.05)  # scores in [0, 1] on their whole scale, so changes keep their size
        elif unit in ("samples / s", "seconds"):
            axis.set_ylim(bottom=0)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.set_ylabel(unit)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"{title}: per epoch")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def target_metric(history: list[dict[str, Any]]) -> str | None:
    """The validation score a gain is read on: accuracy where the task has one, else the first
    score that counts up (word accuracy, a head's accuracy), else the loss."""
    keys = [key for key in dict.fromkeys(k for record in history for k in record) if key.startswith("eval/")]
    for wanted in (lambda key: key == "eval/accuracy", lambda key: key.endswith("accuracy"), lambda key: key == "eval/loss"):
        found = [key for key in keys if wanted(key)]
        if found:
            return found[0]
    return None


def gain_vs_retention(path: Path, history: list[dict[str, Any]], title: str, exported_epoch: int,
                      baseline: dict[str, Any] | None = None) -> Path | None:
    """The run in the plane of what it gained (the target's validation score) and what it kept
    (the worst reference's retention): one point per evaluation, joined in order; before training
    retention is 1 (with a baseline, the base model's score marks the start); the exported epoch
    is starred. None when the run has no retention references."""
    metric = target_metric(history)
    points = [(record["epoch"], record[metric], record["retention/min"]) for record in history
              if metric in record and "retention/min" in record]
    if not points:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 5))
    axis.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="before training: retention 1")
    start = (baseline or {}).get(metric.removeprefix("eval/"))
    if start is not None:
        axis.plot([start], [1.0], "s", color="tab:grey", markersize=9, label="before: base model (head only)")
        axis.plot([start, points[0][1]], [1.0, points[0][2]], color="tab:grey", linewidth=1, linestyle="--")
    axis.plot([p[1] for p in points], [p[2] for p in points], "o-", color="tab:blue", label="evaluations")
    epochs_at: dict[tuple[float, float], list[int]] = {}  # evaluations that land on one point share a label
    for epoch, x, y in points:
        epochs_at.setdefault((round(x, 4), round(y, 4)), []).append(epoch)
    for (x, y), epochs in epochs_at.items():
        label = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {', '.join(map(str, epochs))}"
        axis.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    exported = next((p for p in points if p[0] == exported_epoch), points[-1])
    axis.plot([exported[1]], [exported[2]], "*", color="tab:red", markersize=16, label=f"after: exported (epoch {exported[0]})")
    axis.set_xlabel(f"{metric} (target task, validation){'; lower is better' if metric == 'eval/loss' else ''}")
    axis.set_ylabel("retention/min (worst reference, after / before)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    axis.set_title(title)
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


def write_run_plots(directory: Path, state: dict[str, Any], recipe, baseline: dict[str, Any] | None = None) -> list[Path]:
    """The run's plots from the loop's final ``state``; ``baseline``: the baseline run's summary."""
    directory.mkdir(parents=True, exist_ok=True)
    history, test = state["history"], state.get("test", {})
    written = []
    if history:
        written.append(learning_curves(directory / "learning_curves.png", history, recipe.name, state.get("ref_before")))
        exported_epoch = state.get("best_epoch") or state["epoch"]  # early stopping exports its best epoch
        retention = gain_vs_retention(directory / "gain_vs_retention.png", history, f"{recipe.name}: gain vs retention",
                                      exported_epoch, (baseline or {}).get("eval"))
        written += [retention] if retention else []
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


def floor_plot(path: Path, points: list[dict[str, Any]], front: list[int], floor: float, chosen: int | None,
               x_label: str, title: str) -> Path:
    """``retention.floor``: every setting explored (``points``: x, retention, label), its
    gain-vs-retention front joined, the floor drawn, the delivered setting starred."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 5))
    axis.scatter([p["x"] for p in points], [p["retention"] for p in points], color="tab:gray", s=25, label="settings explored")
    members = sorted((points[i]["x"], points[i]["retention"]) for i in front)
    axis.plot([m[0] for m in members], [m[1] for m in members], "o-", color="tab:blue", label="gain-vs-retention front")
    labels: dict[tuple[float, float], list[str]] = {}  # front members that land on one point share a label
    for i in front:
        labels.setdefault((points[i]["x"], points[i]["retention"]), []).append(points[i]["label"])
    axis.margins(x=0.2, y=0.1)  # room for the labels at the edges
    middle = sum(axis.get_xlim()) / 2
    for (x, y), names in labels.items():  # a label on the right half reads leftwards, so it stays inside the figure
        axis.annotate(names[0] + (f" (+{len(names) - 1} more)" if len(names) > 1 else ""), (x, y), textcoords="offset points",
                      xytext=(4 if x <= middle else -4, 4), ha="left" if x <= middle else "right", fontsize=7)
    axis.axhline(floor, color="tab:red", linestyle="--", linewidth=1, label=f"floor {floor:g}")
    if chosen is not None:
        axis.scatter([points[chosen]["x"]], [points[chosen]["retention"]], marker="*", s=250, color="tab:green", zorder=3,
                     label="delivered")
    axis.set_xlabel(x_label)
    axis.set_ylabel("retention: min over references of after / before (validation, ratio)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
