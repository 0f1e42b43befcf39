"""Causal language modelling (next-token prediction) with a pretrained decoder (Llama, SmolLM2, ...).

``task.format: text``: rows have ``text`` (plain domain text); every token after the first is
scored. ``format: prompt_response``: rows have ``prompt`` and ``response``; the prompt is a user
turn of the tokenizer's chat template (when it has one, e.g. an instruct model's), the response
follows and ends with the end-of-sequence token, and only the response tokens are scored.

Metrics come from per-rank sums (token NLL, scored tokens, correct argmax predictions, sequences),
so evaluation is sharded and reduced: ``loss`` (mean token NLL), ``perplexity`` = exp(loss),
``token_accuracy`` and ``inverse_perplexity`` = exp(-loss), the geometric-mean probability of the
true next token. Perplexity is lower-is-better; its inverse is what a retention ratio compares
(after / before = perplexity before / perplexity after), as speech compares 1 - WER.

There is no new head: the output projection is the pretrained (usually tied) token embedding, so
``head_names`` is empty, and head-only training (``head_only``, ``lp_ft``, the head-only
baseline) is refused: the base model scored by a ``kind: task`` reference on the target's test
text is the baseline. A ``probe`` reference maps ``text`` and ``label`` (``probe_columns``) and
probes the mean-pooled last hidden states.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field

from raytune_ft.errors import UserError
from raytune_ft.models import mean_pool
from raytune_ft.schema import Recipe, TaskOptions
from raytune_ft.tasks import load_dtype, register
from raytune_ft.tasks.text_classification import check_text_model, encoder_config, load_tokenizer, pad_sequences, tokenize

PAD = -100
# Strategies that train a new head first; refused (with distillation and the post steps, which
# assume class logits) rather than half-supported.
HEAD_STRATEGIES = ("head_only", "lp_ft")


class CausalLMMetrics:
    """Summed token NLL, scored tokens, correct next-token predictions and sequences."""

    names = ("loss", "perplexity", "inverse_perplexity", "token_accuracy", "count")
    retained = ("inverse_perplexity",)  # higher is better: retention = perplexity before / after

    def __init__(self):
        self.sums = torch.zeros(4, dtype=torch.float64)  # NLL, tokens, correct, sequences

    def update(self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        nll_sum, tokens, correct = outputs
        self.sums += torch.tensor([float(nll_sum), float(tokens), float(correct), len(batch["input_ids"])], dtype=torch.float64)

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        loss = float(state[0] / state[1].clamp(min=1))
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),  # exp overflows past ~709
            "inverse_perplexity": math.exp(-loss),
            "token_accuracy": float(state[2] / state[1].clamp(min=1)),
            "count": int(state[3]),
        }


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Logits [B, T, V] at position t predict token t + 1 of targets [B, T] (-100: not scored).
    The mean NLL over scored tokens to train on, and (NLL sum, tokens, correct) for the metrics."""
    logits, targets = logits[:, :-1].float(), targets[:, 1:]
    scored = targets != PAD
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none")  # [B, T-1]
    tokens = scored.sum()
    correct = ((logits.detach().argmax(-1) == targets) & scored).sum()
    return losses.sum() / tokens.clamp(min=1), (losses.detach().sum(), tokens, correct)


@register
class CausalLM:
    name = "causal_lm"
    columns = ("text",)
    probe_columns = ("text", "label")
    metrics = CausalLMMetrics.names

    class Options(TaskOptions):
        model_config = ConfigDict(extra="forbid")
        max_length: int = Field(256, ge=8, le=32768, description="tokens kept per row, prompt included (longer rows are cut at the end)")
        format: Literal["text", "prompt_response"] = Field(
            "text", description="text: score every token of a text column; prompt_response: a prompt column (chat-templated "
                                "user turn, not scored) and a response column (scored, ended with end-of-sequence)")

    @classmethod
    def roles(cls, options: "CausalLM.Options") -> tuple[str, ...]:
        return ("prompt", "response") if options.format == "prompt_response" else cls.columns

    def __init__(self, recipe: Recipe, labels: list[str]):
        self.recipe, self.model_path, self.options = recipe, recipe.model.path, recipe.task
        self.labels = labels  # a probe reference's classes; the task itself has none
        self.num_layers, self.dropout, self.dtype = recipe.model.num_layers, recipe.train.dropout, load_dtype(recipe)

    def check(self) -> None:
        recipe = self.recipe
        unsupported = [field for field, value in (("distill", recipe.distill), ("post.quantize", recipe.post.quantize),
                                                  ("post.prune", recipe.post.prune), ("post.explain", recipe.post.explain)) if value]
        if recipe.baseline.enabled:
            raise UserError("baseline.enabled", f"task {self.name} has no new head to train for a head-only baseline; set it to "
                                                "false and score the base model with a kind: task retention reference on the test text")
        if recipe.strategy.method in HEAD_STRATEGIES:
            raise UserError("strategy.method", f"{recipe.strategy.method} trains a new head first, and task {self.name} has none "
                                               "(its output projection is the pretrained token embedding); use lora, full, freeze or gradual")
        if unsupported:
            raise UserError(unsupported[0], f"not supported by task {self.name} (it assumes class logits); remove it")
        check_text_model(self)

    def tokenizer(self):
        return load_tokenizer(self.model_path)

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Token ids (ragged int32), how many leading tokens are prompt (not scored), and a probe
        reference's class ids."""
        if "prompt" in batch:
            out = self.prompt_response(batch["prompt"], batch["response"])
        else:  # format text, or the text of a probe reference
            ids = tokenize(self.model_path, batch["text"], self.options.max_length)
            out = {"input_ids": ids, "prompt_length": np.zeros(len(ids), dtype=np.int64)}
        if "label" in batch:
            out["labels"] = np.asarray(batch["label"], dtype=np.int64)
        return out

    def prompt_response(self, prompts, responses) -> dict[str, np.ndarray]:
        tokenizer = self.tokenizer()
        ids = np.empty(len(prompts), dtype=object)
        prompt_length = np.zeros(len(prompts), dtype=np.int64)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            if tokenizer.chat_template:
                prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": str(prompt)}], add_generation_prompt=True,
                                                                tokenize=True, return_dict=True)["input_ids"])
            else:
                prompt_ids = tokenizer(str(prompt))["input_ids"]
            response_ids = tokenizer(str(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids[row] = np.asarray((prompt_ids + response_ids)[: self.options.max_length], dtype=np.int32)
            prompt_length[row] = min(len(prompt_ids), self.options.max_length)
        return {"input_ids": ids, "prompt_length": prompt_length}

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Pad to the batch's longest row; target_ids are the inputs with padding and prompt -100."""
        tokenizer = self.tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id)
        positions = torch.arange(input_ids.shape[1])
        prompt = positions[None, :] < torch.tensor(np.asarray(batch["prompt_length"]))[:, None]
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "target_ids": input_ids.masked_fill((attention_mask == 0) | prompt, PAD)}
        if "labels" in batch:
            out["labels"] = torch.tensor(np.asarray(batch["labels"]))
        return out

    def config(self):
        return encoder_config(self.model_path, self.dropout, self.num_layers)

    def skeleton(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config())

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_path, config=self.config(), dtype=self.dtype, use_safetensors=True)

    def head_names(self, model: torch.nn.Module) -> list[str]:
        return []

    def forward(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        return next_token_loss(logits, batch["target_ids"])

    def embed(self, model, batch) -> torch.Tensor:
        """Mean-pooled last hidden states [B, H] (after the final norm); logits only for the last position."""
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True, logits_to_keep=1)
        return mean_pool(outputs.hidden_states[-1], batch["attention_mask"])

    def new_metrics(self) -> CausalLMMetrics:
        return CausalLMMetrics()

    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer().save_pretrained(directory)
