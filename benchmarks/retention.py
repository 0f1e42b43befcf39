"""Gain vs retention: every mitigation on the text case, same seeds and budget, one run.

MiniLM-L6 fine-tuned on drug-review sentiment (target: test macro-F1); reference: a linear probe
for the topic of Debian fortunes on the frozen sentence embeddings (retention = probe accuracy
after / before). Target gain is measured against head-only training (the body frozen):
share of full gain = (method - head_only) / (full - head_only).

Run: make bench-retention   [SEEDS=3]   (writes benchmarks/results/retention.{json,md,png})
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "head_only": ["strategy.method=head_only", "train.lr=2e-3"],
    "full": [],
    "freeze": ["strategy.method=freeze", "strategy.layers=4"],
    "gradual": ["strategy.method=gradual"],
    "lora": ["strategy.method=lora", "strategy.rank=8", "strategy.alpha=16", "train.lr=2e-3"],
    "lp_ft": ["strategy.method=lp_ft", "strategy.head_epochs=1"],
    "l2sp": ["regularizer.method=l2sp", "regularizer.strength=0.1"],
    "ewc": ["regularizer.method=ewc", "regularizer.strength=100", "regularizer.fisher_samples=128"],
    "replay": ["replay.fraction=0.2", "replay.loss_weight=1.0"],
    "wise_ft": ["wise_ft.alphas=[0.25,0.5,0.75,1.0]", "wise_ft.min_retention=0.98", "wise_ft.metric=eval/macro_f1"],
}


def run_method(method: str, seed: int, args) -> dict:
    from raytune_ft.recipe import load_recipe
    from raytune_ft.train.runner import run

    out = ROOT / "runs" / "bench_retention" / f"{method}-seed{seed}"
    overrides = [
        f"output.dir={out}", f"train.seed={seed}", f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.early_stopping=null",
        "baseline.enabled=false", f"data.max_rows={args.train_rows}",
        f"retention.references.0.data.max_rows={args.ref_rows}", *METHODS[method],
    ]
    recipe = load_recipe(ROOT / "jobs" / "text_classification.yaml", overrides)
    started = time.perf_counter()
    summary = run(recipe, force=True)
    retention = summary["retention"]
    return {
        "method": method, "seed": seed, "macro_f1": summary["test"]["macro_f1"], "accuracy": summary["test"]["accuracy"],
        "ref_before": retention["before"]["ref/topics/accuracy"], "ref_after": retention["after"]["ref/topics/accuracy"],
        "retention": retention["retention"]["retention/topics/accuracy"], "worst_retention": retention["worst_during_run"],
        "wall_s": time.perf_counter() - started, "wise_alpha": (summary.get("wise_ft") or {}).get("alpha"),
    }


def table(rows: list[dict]) -> str:
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    seeds = sorted({row["seed"] for row in rows})
    head = {r["seed"]: r["macro_f1"] for r in by_method["head_only"]}
    full_gain = {r["seed"]: r["macro_f1"] - head[r["seed"]] for r in by_method["full"]}

    def stat(values):
        return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    lines = [f"seeds {seeds}; target = test macro-F1 on drug reviews; reference = fortunes topic probe accuracy",
             "", "| method | target macro-F1 | gain vs head-only | share of full's gain | reference acc. | retention | worst retention in run | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for method, group in by_method.items():
        gains = [r["macro_f1"] - head[r["seed"]] for r in group]
        shares = [g / full_gain[r["seed"]] for g, r in zip(gains, group) if abs(full_gain[r["seed"]]) > 1e-9]
        lines.append(f"| {method} | {stat([r['macro_f1'] for r in group])} | {stat(gains)} | {stat(shares) if shares else '-'} | "
                     f"{stat([r['ref_after'] for r in group])} | {stat([r['retention'] for r in group])} | "
                     f"{stat([r['worst_retention'] for r in group])} | {statistics.mean(r['wall_s'] for r in group):.0f} |")
    before = statistics.mean(r["ref_before"] for r in rows)
    lines.append(f"\nreference accuracy of the base model: {before:.3f}")
    return "\n".join(lines)


def scatter(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = {r["seed"]: r["macro_f1"] for r in rows if r["method"] == "head_only"}
    figure, axis = plt.subplots(figsize=(7, 5))
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        axis.scatter([r["macro_f1"] - head[r["seed"]] for r in group], [r["retention"] for r in group], label=method, s=40)
    axis.axhline(0.98, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("target gain over head-only (test macro-F1)")
    axis.set_ylabel("retention (reference probe accuracy, after / before)")
    axis.set_title("MiniLM-L6: drug-review sentiment vs fortunes-topic retention")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--ref-rows", type=int, default=400)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()

    rows = []
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):
        for method in args.methods.split(","):
            rows.append(run_method(method, seed, args))
            print(json.dumps(rows[-1]), flush=True)
            (out / "retention.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    (out / "retention.md").write_text(text + "\n")
    scatter(rows, out / "retention.png")
    print(text)


if __name__ == "__main__":
    main()
