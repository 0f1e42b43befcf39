"""One self-contained HTML page per run (``<run>/report.html``): a file to mail or archive.

Everything is inline (CSS, images as base64 data URIs) and no script runs. The page reads only
what the run directory holds: ``summary.json``, ``recipe.yaml``, ``plots/*.png`` and the
post-step results (``post/<step>.json``); a step this module does not know is shown as a
generic table, so new steps appear without changes here. Every text is escaped.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from raytune_ft import run_folder

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1150px; margin: 24px auto; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 2px; margin-top: 32px; }
.meta { color: #555; }
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


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` (atomically) from what a finished run left; returns its path."""
    run_dir = Path(run_dir)
    summary = run_folder.read_summary(run_dir)
    recipe = run_dir / run_folder.RECIPE
    title = f"{summary.get('name', run_dir.name)}: {summary.get('task', '')}"
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p class='meta'>model {esc(summary.get('model'))} &middot; strategy {esc(summary.get('strategy'))} &middot; "
        f"{esc(summary.get('workers'))} workers ({esc(summary.get('backend'))}) &middot; {esc(run_dir.resolve())}</p>",
        headline_section(summary),
        retention_section(summary.get("retention")),
        plots_section(run_dir),
        wise_ft_section(summary.get("wise_ft")),
        *(post_section(name, result, run_dir) for name, result in run_folder.post_results(run_dir).items()),
        timings_section(summary),
        f"<h2>Recipe</h2><details><summary>recipe.yaml</summary><pre>{esc(recipe.read_text())}</pre></details>" if recipe.is_file() else "",
    ]
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(part for part in body if part) + "\n</body></html>\n")
    run_folder.write_text_atomic(run_dir / run_folder.REPORT, page)
    return run_dir / run_folder.REPORT


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: Any, signed: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else esc(value)
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    return f"{value:+.4f}" if signed else f"{value:.4g}" if abs(value) >= 1000 or (value and abs(value) < 1e-3) else f"{value:.4f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A table of escaped cells; numbers right-aligned. A cell that is already markup comes as
    ``("html", markup)``."""
    def cell(value: Any) -> str:
        if isinstance(value, tuple) and value[0] == "html":
            return f"<td>{value[1]}</td>"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"<td class='num'>{number(value)}</td>"
        return f"<td>{esc('-' if value is None else value)}</td>"

    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in rows) + "</table>"


def signed(value: float | None) -> tuple[str, str]:
    """A gain as markup, green when positive, red when negative."""
    if value is None:
        return ("html", "-")
    return ("html", f"<span class='{'good' if value > 0 else 'bad' if value < 0 else ''}'>{number(value, signed=True)}</span>")


def image(path: Path, caption: str = "") -> str:
    """A figure with the image inlined as a data URI; a visible note when the file is missing."""
    if not path.is_file() or path.suffix.lower() not in IMAGE_TYPES:
        return f"<p class='missing'>missing image: {esc(path)}</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    text = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure><img src='data:{IMAGE_TYPES[path.suffix.lower()]};base64,{data}' alt='{esc(caption or path.name)}'>{text}</figure>"


def headline_section(summary: dict[str, Any]) -> str:
    target, base = summary.get("test") or summary.get("eval") or {}, summary.get("baseline") or {}
    split = "test" if summary.get("test") else "validation"
    rows = []
    for key in TARGET_METRICS:
        if key in target:
            gain = target[key] - base[key] if key in base else None
            rows.append([f"{split} {key}", base.get(key), target[key], signed(gain)])
    if not rows:
        return "<h2>Target task</h2><p>no target metrics recorded</p>"
    count = f" ({target['count']} examples)" if "count" in target else ""
    return (f"<h2>Target task</h2><p>{esc(split)} split{esc(count)}; base model: the pretrained body frozen, only a new head trained</p>"
            + table(["metric", "base model (head only)", "fine-tuned", "gain"], rows))


def retention_section(retention: dict[str, Any] | None) -> str:
    if not retention:
        return ""
    rows = [[key.removeprefix("ref/"), before, retention["after"].get(key),
             retention["retention"].get("retention/" + key.removeprefix("ref/"))]
            for key, before in retention["before"].items()]
    worst = retention.get("worst_during_run")
    lowest = retention["retention"].get("retention/min")
    return ("<h2>Retention</h2><p>the reference tasks before fine-tuning (the pretrained model) and after; "
            "retention = after / before</p>" + table(["reference metric", "before", "after", "retention"], rows)
            + f"<p>lowest retention at the end {number(lowest)}; worst during the run {number(worst)}</p>")


def plots_section(run_dir: Path) -> str:
    files = sorted((run_dir / "plots").glob("*.png"), key=lambda p: (p.name != "learning_curves.png", p.name))
    if not files:
        return ""
    return "<h2>Plots</h2>" + "".join(image(path, path.stem.replace("_", " ")) for path in files)


def wise_ft_section(wise: dict[str, Any] | None) -> str:
    if not wise:
        return ""
    keys = [key for key in dict.fromkeys(k for row in wise["rows"] for k in row) if key != "alpha"]
    rows = [[("html", f"<b>{number(row['alpha'])}</b>") if row["alpha"] == wise["alpha"] else row["alpha"], *(row.get(k) for k in keys)]
            for row in wise["rows"]]
    return (f"<h2>WiSE-FT sweep</h2><p>weights (1 - alpha) base + alpha fine-tuned; exported alpha {number(wise['alpha'])} (bold)</p>"
            + table(["alpha", *keys], rows))


def timings_section(summary: dict[str, Any]) -> str:
    fields = [("wall time (s)", "wall_time_s"), ("training time (s)", "train_time_s"), ("evaluation time (s)", "eval_time_s"),
              ("training samples/s", "train_samples_per_s"), ("data wait (fraction of training)", "data_wait_fraction"),
              ("epochs", "epochs"), ("optimizer steps", "steps"), ("stopped early", "stopped_early"),
              ("resumed at", "resumed_at")]
    return "<h2>Timings</h2>" + table(["", "value"], [[label, summary.get(key)] for label, key in fields if key in summary])


def post_section(name: str, result: dict[str, Any], run_dir: Path) -> str:
    render = {"explain": explain_section}.get(name, generic_section)
    return f"<h2>Post-training: {esc(name)}</h2>" + render(result, run_dir)


def explain_section(result: dict[str, Any], run_dir: Path) -> str:
    parts = [f"<p>{esc(result['method'].replace('_', ' '))}; examples: {esc(result['selection'])}; "
             f"largest completeness error {number(100 * result['max_relative_completeness_error'])}% of the logit difference; "
             f"{number(result.get('time_s'))} s</p>"]
    for example in result["examples"]:
        verdict = "correct" if example["correct"] else "wrong"
        parts.append(
            f"<div class='example'><b>test row {esc(example['row'])}</b>: true {esc(example['true'])}, predicted "
            f"{esc(example['predicted'])} (p = {number(example['probability'])}, <span class='{'good' if example['correct'] else 'bad'}'>{verdict}</span>; "
            f"{esc(example['steps'])} steps, completeness error {number(100 * example['completeness_error'] / max(abs(example['logit_difference']), 1e-12))}%)"
            + (f"<p class='text'>{esc(example['text'])}</p>" if "text" in example else "")
            + (f"<p>top tokens: {', '.join(f'<code>{esc(token)}</code> {number(score, signed=True)}' for token, score in example['top_tokens'])}</p>"
               if example.get("top_tokens") else "")
            + image(run_dir / example["png"])
            + (f"<details><summary>attention map</summary>{image(run_dir / example['attention_png'])}</details>" if example.get("attention_png") else "")
            + "</div>")
    return "".join(parts)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys to leaves; a list of dicts stays whole (it becomes a table)."""
    if isinstance(value, dict) and value:
        return [pair for key, item in value.items() for pair in flatten(item, f"{prefix}.{key}" if prefix else str(key))]
    return [(prefix, value)]


def generic_section(result: dict[str, Any], run_dir: Path) -> str:
    """Scalars as a key/value table, lists of records as tables, image paths inlined."""
    scalars, parts = [], []
    for key, value in flatten(result):
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            columns = list(dict.fromkeys(k for row in value for k in row))
            parts.append(f"<h3>{esc(key)}</h3>" + table(columns, [[cell_value(row.get(c)) for c in columns] for row in value]))
        elif isinstance(value, str) and Path(value).suffix.lower() in IMAGE_TYPES and (run_dir / value).is_file():
            parts.append(image(run_dir / value, key))
        else:
            scalars.append([key, cell_value(value)])
    return (table(["", "value"], scalars) if scalars else "") + "".join(parts)


def cell_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value)
