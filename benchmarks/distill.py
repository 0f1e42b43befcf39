"""Knowledge distillation, measured: the 3-layer MiniLM student of `jobs/text_distillation.yaml`
trained with the teacher and without it (same data, budget and seed), over several seeds, against
the teacher (the demo's fine-tuned 6-layer MiniLM: run `make demo` first).

    make bench-distill                       # 3 seeds, teacher runs/text_classification
    .venv/bin/python benchmarks/distill.py --seeds 1 --teacher runs/text_classification

Writes benchmarks/results/distill.json and distill.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("accuracy", "macro_f1", "loss")


def student(teacher: Path, seed: int, epochs: int, with_teacher: bool, output: Path) -> dict:
    command = [sys.executable, "-m", "raytune_ft.cli", "run", "jobs/text_distillation.yaml", "--force", "--output", str(output),
               "--set", f"train.seed={seed}", "--set", f"train.epochs={epochs}", "--set", "post.report=false",
               "--set", f"distill.teacher={teacher}" if with_teacher else "distill=null"]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((output / "summary.json").read_text())
    return {"seed": seed, **{k: summary["test"][k] for k in METRICS}, "epochs": summary["epochs"],
            "train_samples_per_s": summary["train_samples_per_s"], "wall_time_s": summary["wall_time_s"],
            "teacher_test": ((summary.get("distill") or {}).get("teacher") or {}).get("test")}


def spread(rows: list[dict], key: str) -> dict:
    values = [row[key] for row in rows]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(ROOT / "runs" / "text_classification"), help="a finished run of the text recipe")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="the recipe's 5 leave a 3-layer student at the majority class")
    args = parser.parse_args()
    teacher = Path(args.teacher).resolve()
    teacher_summary = json.loads((teacher / "summary.json").read_text())

    work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    arms = {"distilled": [], "without_teacher": []}
    for seed in range(1, args.seeds + 1):  # alternate the arms: the machine's load hits both alike
        arms["distilled"].append(student(teacher, seed, args.epochs, True, work / f"distilled_{seed}"))
        arms["without_teacher"].append(student(teacher, seed, args.epochs, False, work / f"plain_{seed}"))
    result = {
        "settings": vars(args),
        "teacher": {"run": str(teacher), **{k: teacher_summary["test"][k] for k in METRICS}},
        "arms": {name: {"runs": rows, **{k: spread(rows, k) for k in (*METRICS, "train_samples_per_s")}} for name, rows in arms.items()},
    }
    out = ROOT / "benchmarks" / "results"
    (out / "distill.json").write_text(json.dumps(result, indent=2))
    lines = ["| model | test accuracy | test macro-F1 | test loss | train samples/s |", "|---|---|---|---|---|",
             f"| teacher (6 layers, {teacher.name}) | {result['teacher']['accuracy']:.4f} | {result['teacher']['macro_f1']:.4f} | {result['teacher']['loss']:.3f} | |"]
    for name, arm in result["arms"].items():
        cells = [f"{arm[k]['mean']:.4f} ± {arm[k]['std']:.4f}" for k in ("accuracy", "macro_f1")]
        lines.append(f"| student (3 layers), {name.replace('_', ' ')} | {cells[0]} | {cells[1]} | "
                     f"{arm['loss']['mean']:.3f} ± {arm['loss']['std']:.3f} | {arm['train_samples_per_s']['mean']:.1f} |")
    (out / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
