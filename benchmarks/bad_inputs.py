"""Bad inputs, kept apart from the project's own tests (issue 43, "How it is checked"): each recipe
in benchmarks/bad_inputs/ goes through the real command line, as a user types it, and must be
answered with exit code 2 and one line naming the field or file, no traceback, within seconds, and
nothing outside the run folder (runs/) created, changed, moved or deleted.

A case's header says how it runs: ``# command: run --workers 64`` (the recipe's path goes after
the subcommand), ``# expect:`` text its one line holds, ``# kind:`` what it did before (hang,
traceback, silent, moved; known-open: not fixed here, reported but not counted), and
``# setup:`` anything the working folder needs beyond the data. Every case runs in a fresh working
folder of its own holding the recipe, ``data/`` (small Parquet files, some with bad cells) and
``model/`` (a 2-layer BERT with 128 positions, built here once).

Run: make bench-bad-inputs   (writes benchmarks/results/bad_inputs.json; 10-40 s
a case on two loaded cores, most of it Python's and the libraries' imports)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "benchmarks" / "bad_inputs"
RESULT = ROOT / "benchmarks" / "results" / "bad_inputs.json"
TIMEOUT_S = 300  # a hang is recorded as one, not waited out
FAST_S = 60  # "within seconds": the checks take about one; the rest is start-up on two loaded cores
WORDS = {"positive": ["great", "excellent", "helpful"], "negative": ["awful", "useless", "painful"]}
FILLER = ["the", "drug", "was", "really", "for", "me", "and", "it", "felt"]


def sentiment_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(sorted(WORDS))
        words = rng.choices(FILLER, k=6) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": label})
    return rows


def build_fixtures(directory: Path) -> None:
    """``data/`` and ``model/``, once: every case's working folder gets a copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from raytune_ft.data import assets

    data = directory / "data"
    data.mkdir(parents=True)
    bad_cells, null_label = sentiment_rows(200, 5), sentiment_rows(200, 6)
    bad_cells[7]["sentence"], bad_cells[9]["sentence"] = "", None
    null_label[3]["sentiment"] = None
    for name, rows in {"train": sentiment_rows(400, 1), "test": sentiment_rows(96, 2), "one_row": sentiment_rows(1, 3),
                       "train_small": sentiment_rows(20, 4), "other": sentiment_rows(400, 7), "bad_cells": bad_cells,
                       "null_label": null_label}.items():
        pq.write_table(pa.Table.from_pylist(rows), data / f"{name}.parquet")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(directory / "model")
    AutoTokenizer.from_pretrained(assets.minilm_l6()).save_pretrained(directory / "model")


def header(recipe: Path) -> dict[str, str]:
    """The case's ``# key: value`` lines."""
    fields = {}
    for line in recipe.read_text().splitlines():
        if not line.startswith("# "):
            break
        key, sep, value = line[2:].partition(": ")
        if sep and key in ("kind", "command", "expect", "setup"):
            fields[key] = value.strip()
    return fields


def interrupted_run_with_other_data(work: Path) -> None:
    """A run folder as an interrupted run leaves it, its recorded recipe reading other data."""
    import yaml

    recipe = yaml.safe_load((work / "recipe.yaml").read_text())
    recipe["data"]["train"] = "data/other.parquet"
    run_dir = work / "runs" / recipe["name"]
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


SETUPS = {"interrupted run with other data": interrupted_run_with_other_data}


def files(work: Path) -> dict[str, str]:
    """Every file of the working folder outside runs/ (the run folders), by its content's digest."""
    return {str(path.relative_to(work)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(work.rglob("*")) if path.is_file() and path.relative_to(work).parts[0] != "runs"}


def run_case(recipe: Path, fixtures: Path, scratch: Path) -> dict:
    case = header(recipe)
    work = scratch / recipe.stem / "work"  # the user's working folder; its parent stands for the user's home
    shutil.copytree(fixtures, work)
    shutil.copy(recipe, work / "recipe.yaml")
    if "setup" in case:
        SETUPS[case["setup"]](work)
    subcommand, *options = shlex.split(case["command"])
    command = [sys.executable, "-m", "raytune_ft.cli", subcommand, "recipe.yaml", *options]
    before = files(work)
    (scratch / recipe.stem / "outside.txt").write_text("a file of the user's, above the working folder\n")
    started = time.perf_counter()
    # A session of its own: a case that hangs is ended with every process it started (Ray's too).
    process = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        code = None
    seconds = time.perf_counter() - started
    after = files(work)
    changed = sorted(name for name in {*before, *after} if before.get(name) != after.get(name))
    outside_kept = (scratch / recipe.stem / "outside.txt").is_file() and work.is_dir()
    lines = [line for line in stderr.splitlines() if line.strip()]
    row = {
        "case": recipe.stem, "kind": case.get("kind"), "command": f"raytune-ft {subcommand} recipe.yaml {' '.join(options)}".strip(),
        "exit_code": code, "timed_out": code is None, "stderr_lines": len(lines), "line": lines[-1] if lines else "",
        "seconds": round(seconds, 1), "traceback": "Traceback" in stderr,
        "files_changed_outside_run_folder": changed + ([] if outside_kept else ["../outside.txt or the working folder itself"]),
        "expected": case.get("expect", ""),
    }
    row["ok"] = (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not row["traceback"]
                 and row["expected"] in lines[0] and seconds < FAST_S and not row["files_changed_outside_run_folder"])
    return row


def main() -> None:
    recipes = sorted(CASES.glob("*.yaml"))
    scratch = Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    try:
        build_fixtures(scratch / "fixtures")
        rows = []
        for recipe in recipes:
            row = run_case(recipe, scratch / "fixtures", scratch)
            rows.append(row)
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['case']}: exit {row['exit_code']}, {row['seconds']} s: {row['line']}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    counted = [row for row in rows if row["kind"] != "known-open"]
    result = {
        "setup": {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                  "python": platform.python_version(), "timeout_s": TIMEOUT_S, "fast_s": FAST_S,
                  "passes_when": "exit 2, one stderr line 'error: ...' holding the expected text, no traceback, "
                                 f"under {FAST_S} s, nothing outside runs/ created, changed, moved or deleted"},
        "summary": {"cases": len(counted), "passed": sum(row["ok"] for row in counted),
                    "known_open": [row["case"] for row in rows if row["kind"] == "known-open"],
                    "by_kind": {kind: sum(row["kind"] == kind for row in counted) for kind in sorted({row["kind"] for row in counted})},
                    "max_seconds": max(row["seconds"] for row in counted)},
        "cases": rows,
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['summary']['passed']} of {len(counted)} cases answered as promised; {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
