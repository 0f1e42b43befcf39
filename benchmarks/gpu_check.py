"""The GPU check (issue 39, item 7): one script for a single-GPU machine, under 8 minutes.

- ``overhead``: ``raytune-ft run`` (Ray Train, 1 GPU worker) against plain ``torchrun
  --nproc_per_node 1`` on the same recipe (``benchmarks/overhead.py``'s two sides): fine-tuning
  the SmolLM2-135M architecture, bf16 autocast on fp32 weights, steady-state samples/s (every
  epoch but the first). Target: raytune-ft / torchrun >= 0.95.
- ``mfu``: bf16 model FLOPs utilisation of those fine-tuning steps (forward, backward, AdamW),
  SDPA attention, for SmolLM2-135M (the overhead runs) and a ~1B Llama (two more runs), through
  raytune-ft's loop and through the plain loop. FLOPs per token = 6 x parameters + 12 x layers x
  hidden x sequence length; the peak is the GPU's dense bf16 figure (``PEAKS``). Target >= 45%.
- ``zero3``: peak GPU memory per worker (``torch.cuda.max_memory_allocated``) of a 1.5B Llama
  under DDP and under ZeRO-3 with the optimizer, and then the parameters too, offloaded to the
  CPU, through the project's backends on Ray Train (``benchmarks/scale.py``'s worker). With one
  worker ZeRO-3 partitions nothing (each rank's share is the whole model), so plain ZeRO-3 is
  left out: what one GPU can show is bf16 storage and offload.

Models are Llama configs with random weights saved as a model directory, with a word-level
tokenizer built here; the rows are random words, each longer than the sequence, so every row is
exactly ``seq_len`` tokens and both sides do identical work. Nothing is downloaded.

Writes ``gpu_overhead.json``, ``gpu_zero3_memory.json``, ``gpu_mfu.json`` (in the order the
parts run) and ``gpu_env.json`` (versions, nvidia-smi, seconds per part) into ``--output-dir`` as
each part ends, and copies them with the log tails to ``$OUT`` when that is set (the device tool
brings back only $OUT). A failed part, or side of a comparison, leaves its error and the rest runs.
``--dry-run`` (or ``GPU_CHECK_DRY=1``): every part on the CPU with tiny models, to exercise the
logic; its files say ``"dry_run": true``.

Run: ``benchmarks/gpu_check.sh`` (installs the carried wheels first; see its header), or
``benchmarks/gpu_check.sh --dry-run`` on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

import overhead
from scale import llama_config, train_size

ROOT = Path(__file__).resolve().parent.parent
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, matched in this order
# against the name nvidia-smi prints ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAKS = [("H100 PCIe", 756e12, "H100 PCIe"), ("H100 NVL", 835e12, "H100 NVL"), ("H200 NVL", 835e12, "H200 NVL"),
         ("H100", 989e12, "H100 SXM"), ("H200", 989e12, "H200 SXM")]
OVERHEAD_TARGET, MFU_TARGET = 0.95, 0.45
VALIDATION_FRACTION = 0.02  # a few rows held out: the loop evaluates every epoch, outside the timed steps
RESULT_FILES = {"overhead": "gpu_overhead.json", "mfu": "gpu_mfu.json", "zero3": "gpu_zero3_memory.json"}
ZERO3_BACKENDS = {  # DDP first: the others are compared with it
    "ddp": ("ddp", {}),
    "zero3_offload_optimizer": ("deepspeed", {"zero_stage": 3, "offload_optimizer": "cpu"}),
    "zero3_offload_optimizer_and_params": ("deepspeed", {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}),
}


def smollm2_135m_config(dry: bool):
    """SmolLM2-135M's architecture (134.5M parameters, tied embeddings), or a tiny one of its shape."""
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
                       rms_norm_eps=1e-5)


def llama_1b_config(dry: bool):
    """The scale benchmark's 1B Llama (hidden 2048, 18 layers: 0.99B parameters), long enough for 2048 tokens."""
    config = llama_config(64, 2) if dry else llama_config(2048, 18)
    config.max_position_embeddings = 4096
    return config


@dataclass(frozen=True)
class Workload:
    """A model and how it is fine-tuned: per-worker batch, tokens per row, steps per epoch, epochs."""

    name: str
    batch_size: int
    seq_len: int
    steps_per_epoch: int
    epochs: int

    @property
    def train_rows(self) -> int:
        return self.batch_size * self.steps_per_epoch


@dataclass
class Check:
    """One invocation: where it writes, what it runs on, and what the parts share."""

    dry: bool
    work: Path
    output: Path
    out: Path | None  # $OUT: the folder the device tool brings back
    threads: int  # CPUs per training worker (and the plain script's threads)
    timeout_s: float  # each raytune-ft or torchrun command's limit
    gpu: dict[str, Any]
    compared: dict[str, dict | Exception] = field(default_factory=dict)  # workload -> both sides' results (overhead and mfu share them)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def header(self) -> dict[str, Any]:
        return {"dry_run": self.dry, "device": self.device, "gpu_name": self.gpu.get("name")}

    def write(self, name: str, content: dict[str, Any]) -> None:
        """Write one result file, and copy it to $OUT at once (a run cut short still brings back what it finished)."""
        path = self.output / name
        path.write_text(json.dumps({**self.header(), **content}, indent=2))
        if self.out:
            shutil.copy(path, self.out / name)


def workloads(dry: bool) -> dict[str, tuple[Workload, Callable]]:
    """Per model: how it trains, and its config. On the GPU the batch and sequence give the GPU
    enough work per step (32k tokens for 135M, 16k for 1B: tens to hundreds of milliseconds) and
    each epoch lasts seconds, so per-epoch costs weigh little."""
    if dry:
        return {"smollm2_135m": (Workload("smollm2_135m", 4, 32, 6, 3), smollm2_135m_config),
                "llama_1b": (Workload("llama_1b", 4, 32, 6, 2), llama_1b_config)}
    return {"smollm2_135m": (Workload("smollm2_135m", 16, 2048, 60, 3), smollm2_135m_config),
            "llama_1b": (Workload("llama_1b", 8, 2048, 24, 2), llama_1b_config)}


def zero3_setup(dry: bool) -> dict[str, Any]:
    """The ZeRO-3 memory model: the scale benchmark's 1.5B Llama (hidden 2048, 28 layers), one
    sequence a step, so model states, not activations, dominate the peak; two steps (the first
    allocates the optimizer state, the second shows the steady peak); most of the machine's CPUs
    for the offloaded optimizer's step."""
    if dry:
        return {"size": (64, 2), "batch_size": 1, "seq_len": 32, "steps": 2, "threads": 1}
    return {"size": (2048, 28), "batch_size": 1, "seq_len": 1024, "steps": 2, "threads": max(1, (os.cpu_count() or 2) - 4)}


# --- the model directory, tokenizer and rows ------------------------------------------------

def save_random_model(config, directory: str, device: str) -> None:
    """A causal LM of ``config`` with random weights, saved as a model directory (bf16)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # billions of random weights: seconds on a GPU, minutes on a CPU core
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)


def save_word_tokenizer(vocab_size: int, directory: Path) -> None:
    """A word-level tokenizer: word ``w<i>`` is token i (0 unknown, 1 end of sequence and padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>").save_pretrained(directory)


def write_rows(path: Path, count: int, words: int, vocab_size: int) -> None:
    """``count`` rows of ``words`` random words each."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.random.default_rng(0).integers(2, vocab_size, size=(count, words))
    pq.write_table(pa.table({"text": [" ".join(f"w{i}" for i in row) for row in ids]}), path)


def prepare(check: Check, workload: Workload, config) -> Path:
    """The workload's model directory, rows and recipe (both sides read the recipe); returns the recipe's path."""
    directory = check.work / workload.name
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "model").mkdir(parents=True)
    # In a child process, so this one never holds a CUDA context while the runs measure.
    child = multiprocessing.get_context("spawn").Process(target=save_random_model, args=(config, str(directory / "model"), check.device))
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"building the {workload.name} model failed (exit {child.exitcode})")
    save_word_tokenizer(config.vocab_size, directory / "model")
    # Enough rows that max_rows of them stay outside the validation holdout; each longer than the
    # sequence, so truncation makes every row exactly seq_len tokens (no padding).
    write_rows(directory / "train.parquet", int(workload.train_rows / (1 - 2 * VALIDATION_FRACTION)) + 8, workload.seq_len + 8,
               config.vocab_size)
    recipe = {
        "name": f"gpu_check_{workload.name}",
        "task": {"type": "causal_lm", "max_length": workload.seq_len},
        "model": {"path": str(directory / "model"), "dtype": "fp32"},  # fp32 master weights, bf16 autocast: mixed precision
        "data": {"train": str(directory / "train.parquet"), "validation_fraction": VALIDATION_FRACTION, "max_rows": workload.train_rows,
                 "columns": {"text": "text"}},
        "strategy": {"method": "full"},
        "train": {"backend": "ddp", "lr": 1e-5, "warmup": 0.0, "schedule": "constant", "epochs": workload.epochs,
                  "batch_size": workload.batch_size, "eval_batch_size": workload.batch_size, "clip_grad_norm": 1.0,
                  "precision": "bf16", "log_every": workload.steps_per_epoch},
        "scaling": {"workers": 1, "use_gpu": not check.dry, "resources_per_worker": {"CPU": check.threads}},
        "baseline": {"enabled": False},
        "post": {"report": False},
        "output": {"dir": str(directory / "run"), "checkpoints_to_keep": 1},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --- the parts ---------------------------------------------------------------------------

def compare(check: Check, name: str) -> dict[str, Any]:
    """raytune-ft against plain torchrun on one workload (both sides of ``overhead.py``); once per
    invocation (a failure too: the next part that needs it is told, not made to wait for it again)."""
    if isinstance(check.compared.get(name), Exception):
        raise RuntimeError(f"{name} failed in an earlier part") from check.compared[name]
    if name not in check.compared:
        try:
            check.compared[name] = run_both(check, name)
        except Exception as error:
            check.compared[name] = error
            raise
    return check.compared[name]


def failure(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))[-3000:]


def run_both(check: Check, name: str) -> dict[str, Any]:
    """Both sides on one workload. A side that fails leaves its error and the other still runs:
    a GPU is lent for minutes, so each run should bring back what it can."""
    from transformers import AutoModelForCausalLM

    workload, make_config = workloads(check.dry)[name]
    config = make_config(check.dry)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())  # tied weights once
    recipe = prepare(check, workload, config)
    logs = check.work / "logs"
    sides = {  # the plain side first: it is the quicker (no checkpoints), so a call cut short has it
        "plain_torchrun": lambda: overhead.plain(recipe, [], workers=1, threads=check.threads, log=logs / f"{name}_torchrun.log",
                                                 timeout=check.timeout_s),
        "raytune_ft": lambda: overhead.raytune_ft(recipe, [], recipe.parent / "run", log=logs / f"{name}_raytune_ft.log",
                                                  timeout=check.timeout_s),
    }
    results = {}
    try:
        for side, measure in sides.items():
            try:
                results[side] = measure()
            except Exception as error:
                results[side] = {"error": failure(error)}
    finally:
        shutil.rmtree(recipe.parent, ignore_errors=True)  # a 1B run leaves tens of GB of checkpoints
    ours, plain = results["raytune_ft"], results["plain_torchrun"]
    both = "error" not in ours and "error" not in plain
    if both and ours["train_rows"] != plain["train_rows"]:
        raise RuntimeError(f"{name}: raytune-ft trained on {ours['train_rows']} rows, torchrun on {plain['train_rows']}")
    return {"workload": asdict(workload), "layers": config.num_hidden_layers, "hidden": config.hidden_size, "params": params,
            "attention": plain.get("attention"), "raytune_ft": ours, "plain_torchrun": plain,
            "ratio": ours["steady_samples_per_s"] / plain["steady_samples_per_s"] if both else None}


def failures(sides: dict[str, dict]) -> list[str]:
    """Each failed side, named, with the last line of its error (the exception)."""
    return [f"{side}: {result['error'].strip().splitlines()[-1]}" for side, result in sides.items() if "error" in result]


def overhead_part(check: Check) -> dict[str, Any]:
    result = compare(check, "smollm2_135m")
    ratio = result["ratio"]
    return {"target": f">= {OVERHEAD_TARGET}", "ratio": ratio, "meets_target": None if ratio is None else ratio >= OVERHEAD_TARGET,
            "failures": failures({side: result[side] for side in ("raytune_ft", "plain_torchrun")}),
            "raytune_ft": result["raytune_ft"], "plain_torchrun": result["plain_torchrun"],
            "setup": {"model": "SmolLM2-135M architecture, random weights" + (" (tiny in the dry run)" if check.dry else ""),
                      "params": result["params"], **result["workload"], "workers": 1, "cpus_per_worker": check.threads,
                      "precision": "bf16 autocast, fp32 weights, AdamW", "attention": result["attention"],
                      "steady_state": "mean samples/s of every epoch but the first"}}


def dense_bf16_peak(gpu_name: str | None) -> tuple[float | None, str]:
    """The GPU's dense bf16 peak in FLOP/s and which figure it is."""
    for key, flops, figure in PEAKS:
        if gpu_name and key in gpu_name:
            return flops, f"{figure} dense bf16, {flops / 1e12:.0f} TFLOP/s"
    return None, f"no dense bf16 peak on record for {gpu_name or 'a CPU'}: MFU not computed"


def utilisation(samples_per_s: float, seq_len: int, flops_per_token: float, peak: float | None) -> dict[str, float | None]:
    tokens_per_s = samples_per_s * seq_len
    achieved = tokens_per_s * flops_per_token
    return {"samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s, "tflop_per_s": achieved / 1e12,
            "mfu": achieved / peak if peak else None}


def mfu_part(check: Check) -> dict[str, Any]:
    peak, peak_source = dense_bf16_peak(check.gpu.get("name"))
    models, problems = {}, []
    summary = {"target": f"mfu >= {MFU_TARGET}", "failures": problems, "peak_flop_per_s": peak, "peak_source": peak_source,
               "flops_per_token": "6 x parameters (tied embeddings once) + 12 x layers x hidden x sequence length",
               "step": "forward + backward + clip + AdamW, bf16 autocast on fp32 weights, steady state (every epoch but the first)",
               "models": models}
    for name in workloads(check.dry):
        try:
            result = compare(check, name)
        except Exception as error:  # the other model is still measured
            models[name] = {"error": failure(error)}
            problems.append(f"{name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            continue
        seq_len = result["workload"]["seq_len"]
        per_token = 6 * result["params"] + 12 * result["layers"] * result["hidden"] * seq_len
        sides = {side: result[side] if "error" in result[side] else utilisation(result[side]["steady_samples_per_s"], seq_len, per_token, peak)
                 for side in ("raytune_ft", "plain_torchrun")}
        problems += [f"{name} {problem}" for problem in failures(sides)]
        ours = sides["raytune_ft"]
        models[name] = {"params": result["params"], "layers": result["layers"], "hidden": result["hidden"], **result["workload"],
                        "attention": result["attention"], "flops_per_token": per_token, "raytune_ft": ours,
                        "plain_torch": sides["plain_torchrun"], "raytune_ft_over_plain": result["ratio"],
                        "meets_target": None if ours.get("mfu") is None else ours["mfu"] >= MFU_TARGET}
        check.write(RESULT_FILES["mfu"], {**summary, "unfinished": True})  # SmolLM2's figures, should the 1B runs outlast the call
    return summary


def zero3_part(check: Check) -> dict[str, Any]:
    import ray

    from raytune_ft.train.ray_start import QUIET_RAY, start_local_ray

    setup = zero3_setup(check.dry)
    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    rows = {}
    try:
        start_local_ray(num_cpus=max(os.cpu_count() or 1, setup["threads"] + 1), logging_level="WARNING")  # the embedded Ray a run starts
        for label, (kind, options) in ZERO3_BACKENDS.items():
            try:
                row = train_size(setup["size"], kind, options, f"gpu_zero3_{label}", str(check.work / "zero3"), workers=1,
                                 steps=setup["steps"], seq_len=setup["seq_len"], batch_size=setup["batch_size"], precision="bf16",
                                 use_gpu=not check.dry, threads=setup["threads"])
            except Exception as error:  # the next backend still runs
                row = {"completed": False, "error": failure(error)}
            rows[label] = {"backend": kind, "deepspeed": options, **row}
            print(f"[gpu-check] zero3 {label}: {json.dumps(rows[label])[:1000]}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(check.work / "zero3", ignore_errors=True)
    measure = "peak_rss_bytes" if check.dry else "peak_gpu_bytes"  # a CPU run has no GPU memory to measure
    ddp = rows["ddp"]
    ratios = {label: row[measure] / ddp[measure] for label, row in rows.items() if row["completed"] and ddp["completed"] and label != "ddp"}
    hidden, layers = setup["size"]
    return {"failures": [f"{label}: {row['error'].strip().splitlines()[-1]}" for label, row in rows.items() if not row["completed"]],
            "model": {"architecture": "Llama, random weights", "hidden": hidden, "layers": layers, "params": ddp.get("params")},
            **{key: setup[key] for key in ("batch_size", "seq_len", "steps")}, "workers": 1, "cpus_per_worker": setup["threads"],
            "precision": "train.precision bf16: DDP autocasts on fp32 weights; DeepSpeed holds bf16 weights, fp32 masters with the optimizer",
            "measure": measure, "ratio_to_ddp": ratios, "rows": rows,
            "one_gpu": "with one worker ZeRO-3 partitions nothing (each rank's share is the whole model): one GPU shows bf16 "
                       "storage and CPU offload; the 1/N partitioning needs N GPUs (measured on CPUs by benchmarks/scale.py)"}


# The 1B runs (in mfu) come last: the longest, and the likeliest to outrun a device call.
PARTS = {"overhead": overhead_part, "zero3": zero3_part, "mfu": mfu_part}


# --- the environment and the files --------------------------------------------------------

def gpu_info(dry: bool) -> dict[str, Any]:
    """nvidia-smi's view of the GPU (none in a dry run)."""
    if dry or not shutil.which("nvidia-smi"):
        return {}
    fields = "name,memory.total,driver_version,clocks.max.sm,power.limit"
    query = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True).stdout
    values = [value.strip() for value in query.splitlines()[0].split(",")] if query.strip() else []
    return {**dict(zip(fields.split(","), values)), "nvidia_smi": subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout}


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "transformers", "ray", "deepspeed", "peft", "accelerate", "pydantic", "numpy", "pyarrow"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment(check: Check, seconds: dict[str, float], status: dict[str, str]) -> dict[str, Any]:
    git = shutil.which("git") and subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    commit = git.stdout.strip() if git and git.returncode == 0 else None  # the GPU machine's copy may have no .git
    return {"gpu": check.gpu, "python": platform.python_version(), "versions": versions(),
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "disk_free_bytes": shutil.disk_usage(check.work).free,  # a 1B run's checkpoints take tens of GB for a while
            "commit": commit, "seconds": seconds, "parts": status}


def save_log_tails(check: Check) -> None:
    """The last lines of every command's log, in one file beside the results in $OUT."""
    if not check.out:
        return
    tails = [f"==> {log.name} <==\n" + "\n".join(log.read_text(errors="replace").splitlines()[-150:])
             for log in sorted((check.work / "logs").glob("*.log"))]
    (check.out / "gpu_check_logs.txt").write_text("\n\n".join(tails))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                        help="every part on the CPU with tiny models (also GPU_CHECK_DRY=1)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--output-dir", help="where the JSON files go (default benchmarks/results; dry run: runs/gpu_check_dry)")
    parser.add_argument("--work-dir", default="runs/gpu_check", help="models, rows, runs and logs (removed as each part ends)")
    args = parser.parse_args()
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU here: run with --dry-run (GPU_CHECK_DRY=1) to exercise the check on the CPU")

    output = Path(args.output_dir or ("runs/gpu_check_dry" if args.dry_run else "benchmarks/results")).resolve()
    check = Check(dry=args.dry_run, work=Path(args.work_dir).resolve(), output=output,
                  out=Path(os.environ["OUT"]) if os.environ.get("OUT") else None, threads=1 if args.dry_run else 4,
                  timeout_s=300, gpu=gpu_info(args.dry_run), compared={})
    for folder in (check.work / "logs", check.output):
        folder.mkdir(parents=True, exist_ok=True)
    seconds, status, started = {}, {}, time.perf_counter()
    for part in args.parts.split(","):
        began = time.perf_counter()
        print(f"[gpu-check] {part} ({'dry run, CPU' if check.dry else check.gpu.get('name')})", flush=True)
        try:
            result = PARTS[part](check)
            status[part] = f"incomplete: {'; '.join(result['failures'])[:300]}" if result["failures"] else "completed"
        except Exception as error:  # the other parts still run; the file says what broke
            result = {"failures": [str(error)[:300]], "error": failure(error)}
            status[part] = f"failed: {str(error).splitlines()[0][:200] if str(error) else type(error).__name__}"
        seconds[part] = time.perf_counter() - began
        check.write(RESULT_FILES[part], result)
        seconds["total"] = time.perf_counter() - started
        check.write("gpu_env.json", environment(check, seconds, status))
        save_log_tails(check)
        print(f"[gpu-check] {part}: {status[part]} in {seconds[part]:.0f} s", flush=True)
    print(json.dumps({"seconds": seconds, "parts": status}, indent=2))
    sys.exit(0 if all(value == "completed" for value in status.values()) else 1)


if __name__ == "__main__":
    main()
