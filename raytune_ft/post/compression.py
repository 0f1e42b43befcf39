"""Compression steps on a finished run: dynamic int8 quantisation and magnitude pruning.

Each measures the run's exported model before and after on the run's test split, writes the
compressed model under ``<run_dir>/post/`` and returns what it cost (accuracy, macro-F1) and what
it saved (size on disk and CPU latency; sparsity).

The quantised model is stored without pickle: ``quantized.safetensors`` holds every float tensor
of the model plus, per quantised Linear, its int8 weight, scale(s), zero point(s) and float bias;
``quantization.json`` names those layers. ``load_quantized`` rebuilds the model from them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
import warnings
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from raytune_ft.errors import UserError
from raytune_ft.tasks import export_pretrained

logger = logging.getLogger(__name__)

QUANTIZED_WEIGHTS = "quantized.safetensors"
QUANTIZED_LAYOUT = "quantization.json"


@contextmanager
def quiet_quantization() -> Iterator[None]:
    """torch.ao.quantization works on this torch but warns on every call that torchao replaces it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        yield


def replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory whole: into a hidden sibling, then swapped in (a rerun replaces the step's
    own earlier output; a reader never sees half of one)."""
    partial, old = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def weights_size(directory: Path) -> int:
    """Bytes of the safetensors weight files in a model directory (tokenizer and config excluded)."""
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def eval_batch_size(run) -> int:
    return run.recipe.train.eval_batch_size or run.recipe.train.batch_size


def median_latencies_ms(run, models: list[nn.Module], batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Median milliseconds per batch of each model on one CPU thread (a stable number on a shared
    machine), the models timed in turn on each batch so that load changes hit them alike."""
    task, threads = run.task(), torch.get_num_threads()
    times: list[list[float]] = [[] for _ in models]
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for model in models:
                task.forward(model, batches[0])  # warm-up: first-call allocations and packing
            for batch in batches:
                for model, spent in zip(models, times):
                    start = time.perf_counter()
                    task.forward(model, batch)
                    spent.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return [1000 * statistics.median(spent) for spent in times]


def quantize_linear(model: nn.Module, weights: str) -> nn.Module:
    """A copy of ``model`` with every nn.Linear dynamically quantised to int8 (activations stay float)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if weights == "per_channel" else default_dynamic_qconfig
    with quiet_quantization():
        return quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: module for name, module in model.named_modules() if isinstance(module, DynamicLinear)}


def float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too: a rebuilt model needs them)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def save_quantized(model: nn.Module, source: Path, directory: Path) -> None:
    """``quantized.safetensors`` + ``quantization.json``, and the source model's config and tokenizer."""
    from safetensors.torch import save_file

    tensors = {name: value.detach().contiguous() for name, value in float_tensors(model).items()}
    layers = {}
    for name, layer in quantized_layers(model).items():
        weight, bias = layer._weight_bias()  # weight: a quantised tensor [out, in]
        per_channel = weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        tensors[f"{name}.weight"] = weight.int_repr()
        tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales() if per_channel else torch.tensor(weight.q_scale(), dtype=torch.float64)
        tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points() if per_channel else torch.tensor(weight.q_zero_point())
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
        layers[name] = {"in_features": layer.in_features, "out_features": layer.out_features, "bias": bias is not None,
                        "scheme": "per_channel" if per_channel else "per_tensor"}
    save_file(tensors, directory / QUANTIZED_WEIGHTS)
    layout = {"format": "dynamic int8 (torch.ao.nn.quantized.dynamic.Linear); load with raytune_ft.post.compression.load_quantized",
              "layers": layers}
    (directory / QUANTIZED_LAYOUT).write_text(json.dumps(layout, indent=2) + "\n")
    for path in source.iterdir():  # config and tokenizer: what it takes to use the model
        if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(path, directory / path.name)


def load_quantized(run, directory: str | Path) -> nn.Module:
    """The quantised model ``save_quantized`` wrote: the run's architecture (built on the meta
    device, never initialised), its Linear layers replaced by int8 ones, every tensor from the file."""
    from safetensors.torch import load_file
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    directory = Path(directory)
    for needed in (QUANTIZED_WEIGHTS, QUANTIZED_LAYOUT):
        if not (directory / needed).is_file():
            raise UserError(str(directory / needed), "missing; is this a directory the quantize step wrote?")
    tensors = load_file(directory / QUANTIZED_WEIGHTS)
    layers = json.loads((directory / QUANTIZED_LAYOUT).read_text())["layers"]
    model = run.task().skeleton().to_empty(device="cpu")
    with quiet_quantization():
        for name, layer in layers.items():
            weight, scale, zero_point = (tensors[f"{name}.{key}"] for key in ("weight", "weight_scale", "weight_zero_point"))
            quantized_weight = (torch._make_per_channel_quantized_tensor(weight, scale, zero_point, 0) if layer["scheme"] == "per_channel"
                                else torch._make_per_tensor_quantized_tensor(weight, float(scale), int(zero_point)))
            module = DynamicLinear(layer["in_features"], layer["out_features"], bias_=layer["bias"], dtype=torch.qint8)
            module.set_weight_bias(quantized_weight, tensors.get(f"{name}.bias"))
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module)
    targets = float_tensors(model)
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise UserError(str(directory / QUANTIZED_WEIGHTS), f"lacks {len(missing)} tensors of the model, e.g. {missing[0]}")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])
    return model.eval()


def quantize(run, options) -> dict[str, Any]:
    """Dynamic int8 quantisation of every nn.Linear: accuracy, size and CPU latency before and after."""
    model = run.load_model()
    quantized = quantize_linear(model, options.weights)
    directory = run.run_dir / "post" / "quantized"
    replace_dir(directory, lambda partial: save_quantized(quantized, run.run_dir / "model", partial))
    reloaded = load_quantized(run, directory)  # measure what is on disk, not what is in memory
    logger.info("quantize: %d Linear layers to int8; evaluating on the test split", len(quantized_layers(reloaded)))
    batch_size = eval_batch_size(run)
    batches = list(islice(run.batches("test", batch_size), options.latency_batches))
    latencies = median_latencies_ms(run, [model, reloaded], batches)
    rows = []
    for label, candidate, size, latency in (("float32 (model/)", model, weights_size(run.run_dir / "model"), latencies[0]),
                                            ("int8 dynamic (post/quantized/)", reloaded, weights_size(directory), latencies[1])):
        metrics = run.evaluate(candidate, batch_size=batch_size)
        rows.append({"model": label, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "loss": metrics["loss"],
                     "size_mb": size / 1e6, "latency_ms": latency})
    before, after = rows
    quantized_params = sum(layer.in_features * layer.out_features for layer in quantized_layers(reloaded).values())
    return {
        "table": rows,
        "accuracy_delta": after["accuracy"] - before["accuracy"],
        "macro_f1_delta": after["macro_f1"] - before["macro_f1"],
        "size_ratio": after["size_mb"] / before["size_mb"],
        "speedup": before["latency_ms"] / after["latency_ms"],
        "layers": len(quantized_layers(reloaded)),
        "weights": options.weights,
        "quantized_param_fraction": quantized_params / sum(p.numel() for p in model.parameters()),
        "latency": f"median of {len(batches)} test batches of {batch_size} rows, CPU, 1 thread",
        "test_rows": metrics["count"],
        "output": str(directory),
    }


def prunable(run, model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights are pruned: every Linear and Conv2d outside the task's head.
    Embeddings and norms are not Linear, so they stay; the head stays too: it is small and
    maps straight to the logits, so zeros there cost accuracy and save next to nothing."""
    head = run.task().head_names(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not any(name == h or name.startswith(h + ".") for h in head)}


def zero_fraction(tensors: list[torch.Tensor]) -> float:
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def train_batches(run, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The train split in read order, again and again."""
    while True:
        yield from run.batches("train", batch_size)


def finetune(run, model: nn.Module, steps: int, lr: float) -> None:
    """``steps`` AdamW steps on the train split with the run's batch size, weight decay, clipping
    and seed. Pruned weights are ``weight_orig * weight_mask`` here, so their zeros stay zero."""
    train, task = run.recipe.train, run.task()
    torch.manual_seed(train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=train.weight_decay)
    model.train()
    for step, batch in enumerate(islice(train_batches(run, train.batch_size), steps), 1):
        loss, _ = task.forward(model, batch)
        loss.backward()
        if train.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps:
            logger.info("prune: fine-tune step %d/%d, loss %.4f", step, steps, loss.item())
    model.eval()


def prune(run, options) -> dict[str, Any]:
    """Magnitude (L1) pruning to ``sparsity``, one threshold (global) or each layer alike, then an
    optional mask-keeping fine-tune: sparsity reached and accuracy at each stage."""
    from torch.nn.utils import prune as torch_prune

    model = run.load_model()
    layers = prunable(run, model)
    if not layers:
        raise UserError("post.prune", f"the model has no Linear or Conv2d layers outside its head ({type(model).__name__})")
    batch_size = eval_batch_size(run)
    rows = [{"model": "fine-tuned (model/)", **run.evaluate(model, batch_size=batch_size)}]
    started = time.perf_counter()
    weights = [(layer, "weight") for layer in layers.values()]
    if options.scope == "global":
        torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured, amount=options.sparsity)
    else:
        for layer, name in weights:
            torch_prune.l1_unstructured(layer, name, amount=options.sparsity)
    prune_time = time.perf_counter() - started
    logger.info("prune: %.0f%% of %d layers' weights (%s); evaluating", 100 * options.sparsity, len(layers), options.scope)
    rows.append({"model": f"pruned ({options.scope})", **run.evaluate(model, batch_size=batch_size)})
    finetune_time = 0.0
    if options.finetune_steps:
        started = time.perf_counter()
        finetune(run, model, options.finetune_steps, options.finetune_lr or run.recipe.train.lr)
        finetune_time = time.perf_counter() - started
        rows.append({"model": f"pruned + {options.finetune_steps} fine-tune steps", **run.evaluate(model, batch_size=batch_size)})
    for layer, name in weights:
        torch_prune.remove(layer, name)  # the zeros become the weights themselves
    directory = run.run_dir / "post" / "pruned"
    replace_dir(directory, lambda partial: export_pretrained(run.task(), model, str(partial)))
    table = [{key: row[key] for key in ("model", "accuracy", "macro_f1", "loss")} for row in rows]
    pruned_weights = [layer.weight for layer in layers.values()]
    return {
        "table": table,
        "accuracy_delta": table[-1]["accuracy"] - table[0]["accuracy"],
        "macro_f1_delta": table[-1]["macro_f1"] - table[0]["macro_f1"],
        "target_sparsity": options.sparsity,
        "scope": options.scope,
        "layers": len(layers),
        "sparsity_pruned": zero_fraction(pruned_weights),
        "sparsity_all": zero_fraction(list(model.parameters())),
        "layer_sparsity_range": [min(zero_fraction([w]) for w in pruned_weights), max(zero_fraction([w]) for w in pruned_weights)],
        "finetune_steps": options.finetune_steps,
        "prune_time_s": prune_time,
        "finetune_time_s": finetune_time,
        "output": str(directory),
    }
