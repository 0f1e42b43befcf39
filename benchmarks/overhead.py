"""Framework overhead: raytune-ft (Ray Train + Ray Data, 2 DDP workers) vs a plain torchrun DDP
script on the same model, batch and rows, side by side in one run. Also the fraction of each
step a worker waits for its next batch from Ray Data.

Steady state = every epoch but the first (which pays process start-up and first-touch costs in
both). Target: raytune-ft / plain >= 0.95; data wait <= 5%.
Run: make bench   (writes benchmarks/results/overhead.json)
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent
ROWS, EPOCHS, BATCH, ROUNDS = 320, 3, 16, 2


def raytune_ft() -> dict:
    run_dir = ROOT / "runs" / "bench_overhead"
    command = [
        sys.executable, "-m", "raytune_ft.cli", "run", "jobs/text_classification.yaml", "--force", "--output", str(run_dir),
        "--set", f"data.max_rows={ROWS}", "--set", f"train.epochs={EPOCHS}", "--set", f"train.batch_size={BATCH}",
        "--set", "baseline.enabled=false", "--set", "train.early_stopping=null",
    ]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    rates = [row["train/samples_per_s"] for row in rows if "train/samples_per_s" in row]
    waits = [row["train/data_wait_fraction"] for row in rows if "train/data_wait_fraction" in row]
    return {"samples_per_s_by_epoch": rates, "steady_samples_per_s": mean(rates[1:]),
            "data_wait_fraction_by_epoch": waits, "data_wait_fraction": summary["data_wait_fraction"],
            "train_rows": summary["plan"]["train_rows"]}


def plain(rows: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "benchmarks/plain_ddp.py",
               "--rows", str(rows), "--epochs", str(EPOCHS), "--batch-size", str(BATCH)]
    output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result["steady_samples_per_s"] = mean(result["samples_per_s_by_epoch"][1:])
    return result


def main() -> None:
    # Alternate the two (ours, plain, ours, plain) and keep each one's best round: the machine is
    # shared and noisy, and a slow round says more about the neighbours than about either side.
    rounds = []
    for _ in range(ROUNDS):
        ours = raytune_ft()
        rounds.append((ours, plain(ours["train_rows"])))
    ours = max((r[0] for r in rounds), key=lambda r: r["steady_samples_per_s"])
    reference = max((r[1] for r in rounds), key=lambda r: r["steady_samples_per_s"])
    ratio = ours["steady_samples_per_s"] / reference["steady_samples_per_s"]
    result = {"raytune_ft": ours, "plain_torchrun": reference, "ratio": ratio,
              "setup": {"model": "MiniLM-L6", "rows": ours["train_rows"], "epochs": EPOCHS, "batch_per_worker": BATCH, "workers": 2, "rounds": ROUNDS},
              "rounds": [{"raytune_ft": a["steady_samples_per_s"], "plain": b["steady_samples_per_s"]} for a, b in rounds]}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    print(f"steady-state samples/s: raytune-ft {ours['steady_samples_per_s']:.2f}, plain torchrun {reference['steady_samples_per_s']:.2f}, "
          f"ratio {ratio:.3f} (target >= 0.95)")
    print(f"data wait fraction (raytune-ft, whole run): {ours['data_wait_fraction']:.1%} (target <= 5%)")


if __name__ == "__main__":
    main()
