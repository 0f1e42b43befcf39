"""The largest model each backend fits: DDP vs ZeRO-2 vs ZeRO-3, fp32, Llama-architecture models
of growing size, on this machine.

Each size is a ``LlamaConfig`` built with random weights (memory and speed do not depend on the
values; no downloads), trained for ``--steps`` AdamW steps on 2 Ray Train workers through the
project's own backends: under ZeRO-3 the model is created straight into its partitions
(``backend.model_building``), as a real run loads it. Per worker, at the worst rank:

- ``model_state_bytes``: every tensor the model and optimizer hold between backward and step
  (parameters or their partitions, gradients, fp32 masters, AdamW moments, DeepSpeed's buffers);
  counted by ``deepspeed_memory.held_bytes``. The DDP backend's gradients are views into its
  all-reduce buckets (``gradient_as_bucket_view``), so counting them counts the buckets: the
  figure is DDP's whole model state.
- ``peak_rss_bytes``: the worker process's peak resident memory (everything).
- ``peak_gpu_bytes``: on a GPU, ``torch.cuda.max_memory_allocated`` (None here; ``gpu_check.py``
  runs this worker on a GPU).
- ``seconds_per_step``: the mean of the steps after the first.

Sizes run smallest first; a backend's first size that fails (Ray's memory monitor kills a worker
above ``RAY_memory_usage_threshold``, 0.92 here, before the kernel would) ends that backend. Then
the shipped text recipe and the real SmolLM2-135M recipe (``jobs/text_classification.yaml``,
``jobs/causal_lm_lora.yaml``, retention references on) run under DDP and under ZeRO-3, side by side. Writes ``benchmarks/results/scale.json`` and ``scale.png``.

Run: ``make bench-scale`` (about an hour on 2 cores; ``--sizes 0.1B,0.25B --no-recipes`` for
a quick look).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from deepspeed_memory import held_bytes

ROOT = Path(__file__).resolve().parent.parent
# name -> (hidden size, layers): 12 * layers * hidden^2 in the blocks plus tied 32k embeddings
SIZES = {"0.1B": (768, 12), "0.25B": (1024, 18), "0.5B": (1280, 24), "1B": (2048, 18), "1.5B": (2048, 28), "2B": (2560, 24)}
BACKENDS = {"ddp": ("ddp", {}), "zero2": ("deepspeed", {"zero_stage": 2}), "zero3": ("deepspeed", {"zero_stage": 3})}
GiB = 2**30


def llama_config(hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32_000, hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 255) // 256 * 256,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       max_position_embeddings=256, tie_word_embeddings=True)


def scale_worker(config: dict) -> None:
    """One size under one backend on one worker: build, step, measure, gather to rank 0."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from raytune_ft.backends import BACKENDS as REGISTRY

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    recipe = config["recipe"]
    backend = REGISTRY[recipe.train.backend](recipe)
    device = ray.train.torch.get_device()
    # A whole model is built where it trains (initialising billions of weights on one CPU core
    # takes minutes); ZeRO-3 places its partitions itself.
    with backend.model_building(), contextlib.nullcontext() if backend.partitioned else device:
        model = AutoModelForCausalLM.from_config(llama_config(*config["size"]), dtype=torch.float32)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    backend.setup(model, total_steps=config["steps"] + 1)
    generator = torch.Generator().manual_seed(ray.train.get_context().get_world_rank())
    tokens = torch.randint(0, 32_000, (config["batch_size"], config["seq_len"]), generator=generator).to(device)

    seconds, held = [], None
    for step in range(config["steps"]):
        started = time.perf_counter()
        with backend.accumulating(True), backend.autocast():
            loss = backend.model(input_ids=tokens, labels=tokens).loss
        backend.backward(loss)
        if step == config["steps"] - 1:  # between backward and step: gradients and optimizer state both alive
            held = held_bytes([list(backend.module.parameters()), getattr(backend, "optimizer", None), getattr(backend.model, "optimizer", None)])
        backend.step(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    mine = {"model_state_bytes": held, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "load_peak_rss_bytes": loaded_rss, "seconds_per_step": sum(seconds[1:]) / max(1, len(seconds) - 1)}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    with tempfile.TemporaryDirectory() as directory:  # Ray Train V2 keeps metrics with checkpoints only
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            Path(directory, "result.json").write_text(json.dumps({"ranks": everyone, "params": params}))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"params": params}, checkpoint=checkpoint)


def train_size(size: tuple[int, int], kind: str, options: dict, run_name: str, storage: str, *, workers: int, steps: int,
               seq_len: int, batch_size: int = 1, precision: str = "fp32", use_gpu: bool = False, threads: int = 1) -> dict:
    """One Llama size (hidden, layers) under one backend (``kind``, its ``deepspeed`` options) on
    Ray Train: whether it completed and, per worker at the worst rank, its memory and step time."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytune_ft.recipe import validate_recipe

    recipe = validate_recipe(dict(
        name="scale", task={"type": "causal_lm"}, model={"path": "scratch"}, data={"train": "synthetic", "columns": {"text": "text"}},
        train={"backend": kind, "batch_size": batch_size, "schedule": "constant", "clip_grad_norm": None, "precision": precision},
        baseline={"enabled": False}, scaling={"workers": workers, "use_gpu": use_gpu, "resources_per_worker": {"CPU": threads}},
        deepspeed=options,
    ))
    trainer = TorchTrainer(
        scale_worker, train_loop_config={"recipe": recipe, "size": size, "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
                                         "threads": threads},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name=run_name, storage_path=str(Path(storage).resolve()),
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        cause = str(error).strip().splitlines()
        return {"completed": False, "error": next((line for line in cause if "OutOfMemory" in line or "memory" in line.lower()), cause[-1])[:300]}
    with result.checkpoint.as_directory() as directory:
        metrics = json.loads(Path(directory, "result.json").read_text())
    ranks = metrics["ranks"]
    measures = ("model_state_bytes", "peak_rss_bytes", "peak_gpu_bytes", "load_peak_rss_bytes", "seconds_per_step")
    worst = {key: None if ranks[0][key] is None else max(rank[key] for rank in ranks) for key in measures}  # GPU memory: None on CPU
    return {"completed": True, "params": metrics["params"], "wall_s": time.perf_counter() - started, **worst}


def run_size(name: str, backend: str, args) -> dict:
    kind, options = BACKENDS[backend]
    return {"size": name, "backend": backend, **train_size(SIZES[name], kind, options, f"scale_{backend}_{name}", args.storage,
                                                           workers=args.workers, steps=args.steps, seq_len=args.seq_len)}


def recipes_side_by_side(storage: Path) -> dict:
    """The shipped text recipe (MiniLM-L6, its topics reference on) and the real SmolLM2-135M
    recipe (its references on), each under DDP and under ZeRO-3; and whether transformers loads
    the ZeRO-3 export alone."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from raytune_ft import load_recipe, run

    loaders = {"text_classification": AutoModelForSequenceClassification, "causal_lm_lora": AutoModelForCausalLM}
    results: dict = {}
    for name, loader in loaders.items():
        for backend, overrides in {"ddp": [], "zero3": ["train.backend=deepspeed", "deepspeed.zero_stage=3"]}.items():
            recipe = load_recipe(ROOT / "jobs" / f"{name}.yaml", [*overrides, f"output.dir={storage / (name + '_' + backend)}", "post.report=false"])
            summary = run(recipe, force=True)
            row = {key: summary[key] for key in ("test", "gain", "retention", "train_samples_per_s", "wall_time_s", "model_load", "steps")}
            row["export_loads_alone"] = loader.from_pretrained(summary["outputs"]["model"]) is not None
            row["adapter"] = "adapter" in summary["outputs"]
            results.setdefault(name, {})[backend] = row
    return results


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (states, peaks) = plt.subplots(1, 2, figsize=(11, 4))
    for backend in BACKENDS:
        done = [row for row in rows if row["backend"] == backend and row["completed"]]
        for axis, key in ((states, "model_state_bytes"), (peaks, "peak_rss_bytes")):
            axis.plot([row["params"] / 1e9 for row in done], [row[key] / GiB for row in done], marker="o", label=backend)
    for axis, title in ((states, "model states per worker"), (peaks, "peak resident memory per worker")):
        axis.set(xlabel="parameters (billions)", ylabel="GiB", title=f"{title} (fp32, 2 workers)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summarise(rows: list[dict]) -> dict:
    """The headline figures: the largest size each backend completed and, at the largest size
    both completed, ZeRO-3 over DDP for model states and peak memory."""
    largest = {backend: max((row["params"] for row in rows if row["backend"] == backend and row["completed"]), default=0) for backend in BACKENDS}
    both = [row["size"] for row in rows if row["backend"] == "ddp" and row["completed"]
            and any(other["size"] == row["size"] and other["backend"] == "zero3" and other["completed"] for other in rows)]
    if not both:
        return {"largest_params": largest}
    at = max(both, key=lambda size: next(row["params"] for row in rows if row["size"] == size))
    ddp, zero3 = (next(row for row in rows if row["size"] == at and row["backend"] == backend) for backend in ("ddp", "zero3"))
    return {"largest_params": largest, "ratio_size": at, "fit_ratio_zero3": largest["zero3"] / max(largest["ddp"], 1),
            "model_state_ratio_fp32_zero3": zero3["model_state_bytes"] / ddp["model_state_bytes"],
            "peak_ratio_zero3": zero3["peak_rss_bytes"] / ddp["peak_rss_bytes"]}


def main() -> None:
    import ray

    from raytune_ft.train.ray_start import QUIET_RAY, start_local_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per size")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--no-recipes", action="store_true", help="skip the shipped recipes under DDP and ZeRO-3")
    parser.add_argument("--storage", default="runs/bench_scale")
    parser.add_argument("--output", default="benchmarks/results/scale.json")
    args = parser.parse_args()

    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_memory_usage_threshold", "0.92")  # Ray kills a worker before the kernel would
    rows = []
    for backend in args.backends.split(","):
        # A fresh embedded Ray for each backend (the one a run starts, with its worker environment):
        # the memory monitor may also kill Train's placement-group cleaner when a size does not
        # fit, and the failed size's CPUs then stay reserved.
        start_local_ray(num_cpus=args.workers + 1, logging_level="WARNING")
        for name in args.sizes.split(","):
            row = run_size(name, backend, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not row["completed"]:
                break  # larger sizes fail too
        ray.shutdown()
    results = {"args": vars(args), "machine": {"cpus": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
               **summarise(rows), "rows": rows}
    if not args.no_recipes:
        results["recipes"] = recipes_side_by_side(Path(args.storage).resolve())
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    plot(rows, output.with_suffix(".png"))
    print(json.dumps({key: value for key, value in results.items() if key not in ("rows", "args")}, indent=2))


if __name__ == "__main__":
    main()
