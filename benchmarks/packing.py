"""Sequence packing against padding: training tokens per second on the chat recipe, side by side.

The shipped ``jobs/chat_sft.yaml`` (SmolLM2-135M-Instruct, LoRA, chatterbot conversations), one
epoch over the same training rows with ``task.packing`` false and true, alternating, ``--repeats``
times each; no references, no generation, no test split (training alone is timed: ``train_time_s``
of the run's summary). Tokens are the training rows' real tokens (padding not counted), counted
through the run's own data pipeline, so both settings divide the same number by their own time.
Packed rows hold several conversations, so a packed step takes ``batch_size`` rows of up to
``max_length`` tokens where a padded step takes ``batch_size`` conversations.

Run: make bench-packing   (writes benchmarks/results/packing.json)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench_packing"


def training_tokens(recipe) -> int:
    """The real tokens of the run's training rows, through the run's own planning and preprocessing."""
    from raytune_ft.data import tabular
    from raytune_ft.train.planning import plan_run

    planned = plan_run(recipe)
    train = next(split for split in planned.splits if split.name == "train")
    rows = tabular.rows_dataset(train, recipe.data, planned.labels).map_batches(planned.task.preprocess, batch_format="numpy")
    return sum(len(ids) for batch in rows.iter_batches(batch_size=256, batch_format="numpy") for ids in batch["input_ids"])


def main() -> None:
    from raytune_ft import load_recipe, run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=160, help="training conversations")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker: conversations (padded) or packed rows")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    sizing = [f"data.max_rows={args.rows}", "data.test=null", "retention=null", "task.max_new_tokens=0", "train.epochs=1",
              f"task.max_length={args.max_length}", f"train.batch_size={args.batch_size}", "post.report=false"]
    runs = []
    tokens = None
    for repeat in range(args.repeats):
        for packing in (False, True):
            recipe = load_recipe(ROOT / "jobs" / "chat_sft.yaml", [*sizing, f"task.packing={str(packing).lower()}",
                                                                   f"output.dir={WORK / f'packing_{packing}_{repeat}'}"])
            summary = run(recipe, force=True)
            if tokens is None:
                tokens = training_tokens(load_recipe(ROOT / "jobs" / "chat_sft.yaml", sizing))
            runs.append({"packing": packing, "repeat": repeat, "train_time_s": summary["train_time_s"], "steps": summary["steps"],
                         "training_rows": summary["plan"]["train_rows"], "tokens_per_s": tokens / summary["train_time_s"]})
            print(json.dumps(runs[-1]), flush=True)
    result = {
        "configuration": {"recipe": "jobs/chat_sft.yaml", "model": "SmolLM2-135M-Instruct", "strategy": "lora r16 q,k,v,o",
                          "conversations": args.rows, "max_length": args.max_length, "batch_size_per_worker": args.batch_size,
                          "workers": 2, "epochs": 1, "training_tokens": tokens, "device": f"CPU, {os.cpu_count()} cores, no GPU", "load_average_1min_at_end": os.getloadavg()[0]},
        "runs": runs,
        **{f"tokens_per_s_{'packed' if packing else 'padded'}": statistics.mean(r["tokens_per_s"] for r in runs if r["packing"] == packing)
           for packing in (False, True)},
    }
    result["speedup"] = result["tokens_per_s_packed"] / result["tokens_per_s_padded"]
    out = ROOT / "benchmarks" / "results" / "packing.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"padded {result['tokens_per_s_padded']:.0f} tokens/s, packed {result['tokens_per_s_packed']:.0f} tokens/s "
          f"({result['speedup']:.2f}x) -> {out}")


if __name__ == "__main__":
    main()
