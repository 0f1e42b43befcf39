"""Saliency for a few test examples: which tokens (text) or pixels (images) moved the prediction.

Integrated gradients (Sundararajan et al. 2017, computed by Captum) attribute the predicted class's
logit to the input: ``(x - x0) * mean over a in [0, 1] of grad F(x0 + a (x - x0))``, the mean taken
with Gauss-Legendre nodes. Attributions sum to ``F(x) - F(x0)`` (completeness): the nodes double until
the sum is within ``tolerance`` of it, and the error left is recorded. ``gradient_x_input`` is the
one-node rule at a = 1: one backward pass, no completeness. Text is attributed at the word embeddings
(baseline: every token but the special ones replaced by [PAD]), images at the normalised pixels
(baseline: a black image). Everything lands in ``<run>/post/explain/``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from raytune_ft.errors import UserError
from raytune_ft.report.plots import _pyplot

logger = logging.getLogger(__name__)

TOP_TOKENS = 5
CHUNK = 32  # path points per batch
MAX_REFINEMENT = 16  # steps may double up to 16 x options.steps


def choose_rows(logits: torch.Tensor, labels: torch.Tensor, count: int) -> list[int]:
    """The ``count`` most confident errors (highest predicted-class probability among wrong
    predictions), filled up with the least confident correct predictions."""
    confidence, predicted = logits.softmax(-1).max(-1)
    wrong = (predicted != labels).nonzero().flatten().tolist()
    right = (predicted == labels).nonzero().flatten().tolist()
    wrong.sort(key=lambda row: -float(confidence[row]))
    right.sort(key=lambda row: float(confidence[row]))
    return (wrong + right)[:count]


def integrated_gradients(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, baseline: torch.Tensor,
                         target: int, options) -> dict[str, Any]:
    """Captum's attributions, shaped like ``inputs`` (one example, no batch dim), for logit
    ``target``, with F(x) - F(x0), the completeness error |sum - (F(x) - F(x0))| and the steps
    used: they double (up to ``MAX_REFINEMENT`` times ``options.steps``) until the error is within
    the tolerance, as a saturated model's logit can jump within a few percent of the path.
    ``gradient_x_input``: (x - x0) times Captum's gradient at x (its InputXGradient knows no
    baseline). ``forward``: [S, ...] -> [S, C]."""
    from captum.attr import IntegratedGradients, Saliency

    with torch.no_grad():
        ends = forward(torch.stack([inputs, baseline]))[:, target]
    difference = float(ends[0] - ends[1])
    one_step = options.method == "gradient_x_input"
    steps = 1 if one_step else options.steps
    while True:
        if one_step:
            gradient = Saliency(forward).attribute(inputs[None].detach().requires_grad_(True), target=target, abs=False)[0]
            attributions = (inputs - baseline) * gradient
        else:
            attributions = IntegratedGradients(forward).attribute(inputs[None], baseline[None], target=target, n_steps=steps,
                                                                  method="gausslegendre", internal_batch_size=CHUNK)[0]
        error = abs(float(attributions.sum()) - difference)
        if one_step or error <= options.tolerance * abs(difference) or steps >= MAX_REFINEMENT * options.steps:
            return {"attributions": attributions, "logit_difference": difference, "completeness_error": error, "steps": steps}
        steps *= 2


def explain(run, options) -> dict[str, Any]:
    """Explain ``options.rows`` of the test split, else its ``options.examples`` most confident errors."""
    started = time.perf_counter()
    if options.rows is not None:  # read first: a bad row fails before the model loads
        rows, selection, raw = options.rows, "rows given", run.rows(options.rows, where="post.explain.rows")
    model = run.load_model()
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # gradients w.r.t. the input only
    if options.rows is None:
        logits, labels = run.predict(model)
        if not len(labels):
            raise UserError("data.test", "the test split has no rows to explain")
        rows, selection = choose_rows(logits, labels, options.examples), "most confident errors"
        raw = run.rows(rows)
    task = run.task()
    batch = task.collate(task.preprocess(raw))
    with torch.no_grad():
        _, (_, logits) = task.forward(model, batch)  # [R, C], the chosen rows in order
    probabilities = logits.softmax(-1)
    out = run.run_dir / "post" / "explain"
    staging = out.with_name("explain.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    explain_one = explain_text if run.recipe.task.type == "text_classification" else explain_image
    examples = []
    for position, row in enumerate(rows):
        predicted, label = int(probabilities[position].argmax()), int(batch["labels"][position])
        example = {"row": row, "true": run.labels[label], "predicted": run.labels[predicted],
                   "probability": float(probabilities[position, predicted]), "correct": predicted == label}
        logger.info("explain: test row %s (%d/%d)", row, position + 1, len(rows))
        example.update(explain_one(model, task, {key: value[position] for key, value in raw.items()},
                                   {key: value[position] for key, value in batch.items()}, example, options, staging))
        for key in ("png", "attention_png", "image"):
            if key in example:
                example[key] = f"post/explain/{example[key]}"
        examples.append(example)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    errors = [example["completeness_error"] / max(abs(example["logit_difference"]), 1e-12) for example in examples]
    return {"method": options.method, "selection": selection, "examples": examples, "max_relative_completeness_error": max(errors),
            "time_s": time.perf_counter() - started}


def explain_text(model, task, raw: dict[str, Any], inputs: dict[str, torch.Tensor], example: dict[str, Any],
                 options, out: Path) -> dict[str, Any]:
    """Token attributions at the word embeddings, summed over the hidden dim; a PNG of the text
    coloured by them, and the last layer's attention (mean over heads)."""
    from raytune_ft.tasks.text_classification import load_tokenizer

    tokenizer = load_tokenizer(task.model_path)
    length = int(inputs["attention_mask"].sum())
    ids = inputs["input_ids"][:length]  # [T] without the batch padding
    special = torch.tensor(tokenizer.get_special_tokens_mask(ids.tolist(), already_has_special_tokens=True), dtype=torch.bool)
    baseline_ids = torch.where(special, ids, torch.tensor(tokenizer.pad_token_id or 0))
    embed = model.get_input_embeddings()
    mask = torch.ones(1, length, dtype=torch.long)

    def forward(embeddings: torch.Tensor) -> torch.Tensor:  # [S, T, H] -> [S, C]
        return model(inputs_embeds=embeddings, attention_mask=mask.expand(len(embeddings), -1)).logits

    predicted = task.labels.index(example["predicted"])
    integrated = integrated_gradients(forward, embed(ids), embed(baseline_ids), predicted, options)
    scores = integrated.pop("attributions").sum(-1)  # [T]
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    name = f"row_{example['row']}"
    result = {
        "text": str(raw["text"]),
        "top_tokens": [[tokens[i], float(scores[i])] for i in scores.abs().argsort(descending=True)[:TOP_TOKENS].tolist()],
        **integrated,
        "png": token_figure(out / f"{name}.png", tokens, scores.numpy(), caption(example)).name,
    }
    if options.attention and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
        with torch.no_grad():
            attention = model(input_ids=ids[None], attention_mask=mask, output_attentions=True).attentions[-1][0].mean(0)  # [T, T]
        result["attention_png"] = attention_figure(out / f"{name}_attention.png", tokens, attention.numpy(), caption(example)).name
    return result


def explain_image(model, task, raw: dict[str, Any], inputs: dict[str, torch.Tensor], example: dict[str, Any],
                  options, out: Path) -> dict[str, Any]:
    """Pixel saliency: |attribution| summed over the channels, over the image the model saw."""
    from raytune_ft.tasks.image_classification import IMAGENET_MEAN, IMAGENET_STD

    pixels = inputs["pixels"]  # [3, S, S], normalised
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    black = ((torch.zeros_like(pixels) - mean) / std)
    predicted = task.labels.index(example["predicted"])
    integrated = integrated_gradients(model, pixels, black, predicted, options)
    saliency = integrated.pop("attributions").abs().sum(0).numpy()  # [S, S]
    image = ((pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # [S, S, 3]
    name = f"row_{example['row']}"
    return {
        "image": save_image(out / f"{name}_input.png", image).name,
        **integrated,
        "png": saliency_figure(out / f"{name}.png", image, saliency, caption(example), options.method).name,
    }


def caption(example: dict[str, Any]) -> str:
    verdict = "correct" if example["correct"] else "wrong"
    return (f"test row {example['row']}: true {example['true']}, predicted {example['predicted']} "
            f"(p = {example['probability']:.2f}, {verdict})")


def token_figure(path: Path, tokens: list[str], scores: np.ndarray, title: str, width: int = 90) -> Path:
    """The tokens as running text, each on a background coloured by its attribution:
    red pushes toward the predicted class, blue away from it."""
    plt = _pyplot()
    from matplotlib.colors import Normalize

    relative = scores / (np.abs(scores).max() or 1)
    colours = plt.get_cmap("bwr")(Normalize(-1, 1)(relative))
    places, x, line = [], 0, 0
    for token in tokens:
        if x and x + len(token) > width:
            x, line = 0, line + 1
        places.append((x, line))
        x += len(token) + 1
    char_inches = 0.6 * 10 / 72  # a monospace glyph at 10 pt is 0.6 em wide
    figure = plt.figure(figsize=((width + 1) * char_inches / 0.98, 0.8 + 0.32 * (line + 1)))
    axis = figure.add_axes((0.01, 0.02, 0.98, 0.96 - 0.5 / (0.8 + 0.32 * (line + 1))))
    axis.set_xlim(-0.5, width + 0.5)
    axis.set_ylim(line + 0.7, -0.7)
    axis.axis("off")
    for token, colour, strength, (x, y) in zip(tokens, colours, np.abs(relative), places):
        axis.text(x, y, token, family="monospace", fontsize=10, va="center", color="white" if strength > 0.6 else "black",
                  bbox={"boxstyle": "square,pad=0.15", "facecolor": colour, "edgecolor": "none"})
    figure.suptitle(f"{title}\nred: toward the prediction, blue: against it", fontsize=10)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def attention_figure(path: Path, tokens: list[str], attention: np.ndarray, title: str) -> Path:
    """The last layer's attention, mean over heads: row i attends to column j."""
    plt = _pyplot()
    size = min(16.0, 3 + 0.16 * len(tokens))
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(attention, cmap="viridis")
    fontsize = max(4, min(9, 300 // max(len(tokens), 1)))
    axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=fontsize)
    axis.set_yticks(range(len(tokens)), tokens, fontsize=fontsize)
    figure.colorbar(image, fraction=0.04)
    axis.set_title(f"{title}\nlast-layer attention, mean over heads", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def saliency_figure(path: Path, image: np.ndarray, saliency: np.ndarray, title: str, method: str) -> Path:
    """The image, and the saliency laid over it in a heat colour map."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(6, 3.4))
    left.imshow(image)
    left.set_title("input", fontsize=9)
    right.imshow(image.mean(-1), cmap="gray")
    right.imshow(saliency, cmap="inferno", alpha=0.6)
    right.set_title(f"|{method.replace('_', ' ')}|, summed over channels", fontsize=9)
    for axis in (left, right):
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_image(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(image).save(path)
    return path
