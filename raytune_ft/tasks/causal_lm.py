"""Causal language modelling (next-token prediction) with a pretrained decoder (Llama, SmolLM2, ...).

Formats (``task.format``), each a set of data roles:

- ``text``: plain domain text; every token after the first is scored.
- ``messages``: a conversation, a list of ``{role, content}`` (system, user, assistant; any number
  of turns; a list, or its JSON text), rendered with the tokenizer's own chat template; only the
  assistant turns are scored (their content and end-of-turn tokens).
- ``prompt_response`` and ``instruction`` (``instruction``, optional ``input``, ``output``: the
  common instruction layouts): one user turn and the answer, rendered the same way.

Without a chat template, user and system turns are plain text and an answer ends with the
end-of-sequence token. ``packing`` concatenates training examples into rows of up to
``max_length`` tokens; each example keeps its own position ids (0, 1, ...), and with no 2-D
attention mask transformers reads the restarts as example boundaries and attends block-diagonally
(``masking_utils.find_packed_sequence_indices``), so no token sees another example.

Metrics come from per-rank sums, so evaluation is sharded and reduced: ``loss`` (mean token NLL),
``perplexity`` = exp(loss), ``token_accuracy``, ``inverse_perplexity`` = exp(-loss) (what a
retention ratio compares: perplexity before / after). With ``max_new_tokens`` > 0, evaluation also
decodes every held-out prompt greedily (the conversation up to its last answer) and scores
``exact_match`` (normalised text) and ``rouge_l`` (F-measure, Google's rouge-score) against that
answer; the first answers are kept as readable samples.

Reference kinds of this task (see ``raytune_ft.addons.references``): ``drift`` (prompts: the base
model's greedy answers, scored by their likelihood under the current model) and ``choice``
(questions with choices, ranked by the mean log-likelihood of each choice as the answer).

There is no new head: the output projection is the pretrained (usually tied) token embedding, so
``head_names`` is empty, and head-only training (``head_only``, ``lp_ft``, the head-only
baseline) is refused: a ``kind: task`` reference on the target's test set scores the base model.
A ``probe`` reference maps ``text`` and ``label`` (``probe_columns``) and probes the mean-pooled
last hidden states.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field

from raytune_ft.errors import UserError
from raytune_ft.models import mean_pool
from raytune_ft.schema import Recipe, TaskOptions
from raytune_ft.tasks import all_ranks_finished, load_dtype, register
from raytune_ft.tasks.speech_recognition import normalise
from raytune_ft.tasks.text_classification import check_text_model, encoder_config, load_tokenizer, pad_sequences

PAD = -100
# Strategies that train a new head first; refused (with distillation and the post steps, which
# assume class logits) rather than half-supported.
HEAD_STRATEGIES = ("head_only", "lp_ft")
FORMAT_ROLES = {"text": ("text",), "messages": ("messages",), "prompt_response": ("prompt", "response"),
                "instruction": ("instruction", "input?", "output")}  # ?: optional
GENERATED = ("exact_match", "rouge_l")
SAMPLES = 24  # answers kept per evaluated set, for the run's generations.md


class CausalLMMetrics:
    """Summed token NLL, scored tokens, correct next-token predictions, sequences and, when
    answers are generated, their count, exact matches and ROUGE-L."""

    names = ("loss", "perplexity", "inverse_perplexity", "token_accuracy", "count")

    def __init__(self, tokenizer=None, generating: bool = False):
        self.tokenizer, self.generating = tokenizer, generating
        self.retained = ("inverse_perplexity", *(GENERATED if generating else ()))  # higher is better
        self.sums = torch.zeros(7, dtype=torch.float64)  # NLL, tokens, correct, sequences, answers, exact, ROUGE-L
        self.samples: list[dict[str, str]] = []

    def update(self, outputs, batch: dict[str, torch.Tensor]) -> None:
        nll_sum, tokens, correct, answers = outputs
        self.sums[:4] += torch.tensor([float(nll_sum), float(tokens), float(correct), len(batch["input_ids"])], dtype=torch.float64)
        if answers is not None:
            for prompt, expected, answer in zip(*texts_of(self.tokenizer, batch, answers)):
                self.add(prompt, expected, answer)

    def add(self, prompt: str, expected: str, answer: str) -> None:
        exact = normalise(expected) == normalise(answer)
        self.sums[4:] += torch.tensor([1.0, float(exact), rouge_l(expected, answer)], dtype=torch.float64)
        if len(self.samples) < SAMPLES:
            self.samples.append({"prompt": prompt, "expected": expected, "answer": answer})

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def compute(self, state: torch.Tensor) -> dict[str, Any]:
        loss = float(state[0] / state[1].clamp(min=1))
        result: dict[str, Any] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),  # exp overflows past ~709
            "inverse_perplexity": math.exp(-loss),
            "token_accuracy": float(state[2] / state[1].clamp(min=1)),
            "count": int(state[3]),
        }
        if state[4] > 0:  # rows with a prompt were answered
            result.update(exact_match=float(state[5] / state[4]), rouge_l=float(state[6] / state[4]), samples=self.samples)
        return result


def rouge_l(expected: str, answer: str) -> float:
    """ROUGE-L F-measure (Google's rouge-score: lower-cased alphanumeric tokens, no stemming)."""
    from rouge_score import rouge_scorer, tokenizers

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))  # named: no log line
    return scorer.score(expected, answer)["rougeL"].fmeasure


def texts_of(tokenizer, batch: dict[str, torch.Tensor], answers: list[np.ndarray]) -> tuple[list[str], list[str], list[str]]:
    """The prompts, expected answers and generated answers of a batch's rows with a prompt."""
    rows = [row for row in range(len(batch["input_ids"])) if int(batch["prompt_length"][row]) > 0]
    prompts, expected = [], []
    for row in rows:
        start, ids = int(batch["prompt_length"][row]), batch["input_ids"][row]
        scored = batch["target_ids"][row, start:] != PAD
        prompts.append(tokenizer.decode(ids[:start], skip_special_tokens=True).strip())
        expected.append(tokenizer.decode(ids[start:][scored], skip_special_tokens=True).strip())
    return prompts, expected, [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in answers]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] at position t predict token t + 1 of targets [B, T] (-100: not scored):
    per-token NLL [B, T-1] (0 where not scored) and the scored mask."""
    logits, targets = logits[:, :-1].float(), targets[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none")
    return losses, targets != PAD


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The mean NLL over scored tokens to train on, and (NLL sum, tokens, correct) for the metrics."""
    losses, scored = token_nll(logits, targets)
    tokens = scored.sum()
    correct = ((logits[:, :-1].detach().argmax(-1) == targets[:, 1:]) & scored).sum()
    return losses.sum() / tokens.clamp(min=1), (losses.detach().sum(), tokens, correct)


def conversation(value) -> list[dict[str, str]]:
    """A ``messages`` cell as a list of {role, content}: Ray Data hands a parquet list of structs
    over as an array of dicts; jsonl may hold it as JSON text."""
    if isinstance(value, str):
        value = json.loads(value)
    return [{"role": str(message["role"]), "content": str(message["content"])} for message in value]


def question_id(text: str) -> int:
    """A stable id for a choice question (its choices' rows may land on different ranks)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def ragged(rows: list[list[int]], dtype) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(row, dtype=dtype) for row in rows]
    return out


@register
class CausalLM:
    name = "causal_lm"
    columns = ("text",)
    probe_columns = ("text", "label")
    metrics = CausalLMMetrics.names + GENERATED

    class Options(TaskOptions):
        model_config = ConfigDict(extra="forbid")
        max_length: int = Field(256, ge=8, le=32768, description="tokens kept per row, prompt included (longer rows are cut at the end)")
        format: Literal["text", "messages", "prompt_response", "instruction"] = Field(
            "text", description="text: score every token of a text column; messages: a conversation (list of {role, content}) "
                                "through the chat template, assistant turns scored; prompt_response, instruction (instruction, "
                                "optional input, output): one user turn and its scored answer")
        packing: bool = Field(False, description="training rows hold several examples up to max_length, each attending only to "
                                                 "itself (per-example position ids); fewer padding tokens")
        max_new_tokens: int = Field(32, ge=0, le=4096, description="evaluation: greedy answers of up to this many tokens to every "
                                                                   "held-out prompt, scored by exact_match and rouge_l (0: none)")

    @classmethod
    def roles(cls, options: "CausalLM.Options") -> tuple[str, ...]:
        return FORMAT_ROLES[options.format]

    @classmethod
    def reference_roles(cls, options: "CausalLM.Options", kind: str) -> list[tuple[str, ...]]:
        """The role sets a reference of ``kind`` may map (``?``: optional): a task reference any
        format's (perplexity on plain text beside chat data), a drift reference prompts, a choice
        reference questions with their choices and the right one's index."""
        return {"task": list(FORMAT_ROLES.values()), "probe": [cls.probe_columns], "drift": [("prompt",)],
                "choice": [("prompt", "choices", "answer")]}.get(kind, [])

    @classmethod
    def metric_names(cls, options: "CausalLM.Options") -> tuple[str, ...]:
        return CausalLMMetrics.names + (GENERATED if options.format != "text" and options.max_new_tokens else ())

    def __init__(self, recipe: Recipe, labels: list[str]):
        self.recipe, self.model_path, self.options = recipe, recipe.model.path, recipe.task
        self.labels = labels  # a probe reference's classes; the task itself has none
        self.num_layers, self.dropout, self.dtype = recipe.model.num_layers, recipe.train.dropout, load_dtype(recipe)
        self._tokenizer = None

    def __getstate__(self):  # sent to Ray Data's workers: the tokenizer loads again there
        return {**self.__dict__, "_tokenizer": None}

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
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    @property
    def packing(self) -> bool:
        return self.options.packing

    # -- data: conversations -> token ids, which tokens are scored, where the last answer starts

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Token ids and scored-token masks (ragged), the prompt length of each row's last answer
        (0: nothing to generate), a probe reference's class ids; a choice question becomes one row
        per choice, with the question's id and whether the choice is right."""
        if "text" in batch:  # format text, or the text of a probe reference
            rows = [self.plain(str(text)) for text in batch["text"]]
            out = self.encoded(rows)
            if "label" in batch:
                out["labels"] = np.asarray(batch["label"], dtype=np.int64)
            return out
        if "choices" in batch:
            rows, questions, correct = [], [], []
            for prompt, choices, answer in zip(batch["prompt"], batch["choices"], batch["answer"]):
                for index, choice in enumerate(choices):
                    rows.append(self.render([{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(choice)}]))
                    questions.append(question_id(str(prompt)))
                    correct.append(index == int(answer))
            return {**self.encoded(rows), "question": np.asarray(questions, dtype=np.int64), "correct": np.asarray(correct, dtype=np.int8)}
        return self.encoded([self.render(messages) for messages in self.conversations(batch)])

    def conversations(self, batch: dict[str, Any]) -> list[list[dict[str, str]]]:
        if "messages" in batch:
            return [conversation(value) for value in batch["messages"]]
        if "instruction" in batch:
            inputs = batch["input"] if "input" in batch else [""] * len(batch["instruction"])
            prompts = [f"{instruction}\n\n{given}" if given is not None and str(given).strip() else str(instruction)
                       for instruction, given in zip(batch["instruction"], inputs)]
            answers = batch["output"]
        else:
            prompts, answers = [str(prompt) for prompt in batch["prompt"]], batch.get("response")
        if answers is None:  # prompts alone (a drift reference): the model answers them
            return [[{"role": "user", "content": prompt}] for prompt in prompts]
        return [[{"role": "user", "content": prompt}, {"role": "assistant", "content": str(answer)}] for prompt, answer in zip(prompts, answers)]

    def plain(self, text: str) -> tuple[list[int], list[int], int]:
        ids = self.tokenizer()(text)["input_ids"]
        return ids, [1] * len(ids), 0

    def render(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int], int]:
        """Token ids, their scored mask (the assistant turns) and the prompt length of the last
        answer. The chat template renders each prefix of the conversation; the text one more
        message adds is that message's segment, tokenised on its own (templates put special tokens
        at the boundaries, so the pieces tokenise as the whole does). A conversation that ends on
        a user turn gets the generation prompt and scores nothing: it is a prompt to answer."""
        tokenizer = self.tokenizer()
        ids: list[int] = []
        scored: list[int] = []
        prompt_length = 0
        rendered = ""
        for i, message in enumerate(messages):
            answer = message["role"] == "assistant"
            if tokenizer.chat_template:
                before = self.template(messages[:i], generation=answer) if i else ""
                after = self.template(messages[: i + 1], generation=False)
                if not before.startswith(rendered) or not after.startswith(before):
                    raise UserError("model.path", f"{self.model_path}: its chat template does not render a conversation "
                                                  "as a prefix of the longer one; it cannot mark the assistant turns")
                pieces = [(before[len(rendered):], False), (after[len(before):], answer)]
                rendered = after
            else:
                pieces = [(message["content"] + ("" if answer else "\n"), answer)]
            for text, is_answer in pieces:
                if not text:
                    continue
                piece = tokenizer(text, add_special_tokens=not ids and not tokenizer.chat_template)["input_ids"]
                if is_answer:
                    prompt_length = len(ids)
                    if not tokenizer.chat_template:
                        piece = piece + [tokenizer.eos_token_id]
                ids += piece
                scored += [int(is_answer)] * len(piece)
        if messages and messages[-1]["role"] != "assistant":
            if tokenizer.chat_template:
                prompt = self.template(messages, generation=True)
                piece = tokenizer(prompt[len(rendered):], add_special_tokens=False)["input_ids"]
                ids, scored = ids + piece, scored + [0] * len(piece)
            prompt_length = len(ids)
        return ids, scored, prompt_length

    def template(self, messages: list[dict[str, str]], generation: bool) -> str:
        return self.tokenizer().apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)

    def encoded(self, rows: list[tuple[list[int], list[int], int]]) -> dict[str, np.ndarray]:
        """Rows cut to max_length: ragged int32 ids, ragged int8 scored masks, prompt lengths."""
        limit = self.options.max_length
        return {"input_ids": ragged([ids[:limit] for ids, _, _ in rows], np.int32),
                "scored": ragged([scored[:limit] for _, scored, _ in rows], np.int8),
                "prompt_length": np.asarray([min(start, limit) for _, _, start in rows], dtype=np.int64)}

    def pack(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Training rows packed greedily, in order, into rows of up to max_length tokens, with each
        example's own position ids (0, 1, ...)."""
        rows: list[tuple[list, list, list]] = []
        for ids, scored in zip(batch["input_ids"], batch["scored"]):
            if not rows or len(rows[-1][0]) + len(ids) > self.options.max_length:
                rows.append(([], [], []))
            rows[-1][0].extend(ids)
            rows[-1][1].extend(scored)
            rows[-1][2].extend(range(len(ids)))
        return {"input_ids": ragged([r[0] for r in rows], np.int32), "scored": ragged([r[1] for r in rows], np.int8),
                "position_ids": ragged([r[2] for r in rows], np.int64), "prompt_length": np.zeros(len(rows), dtype=np.int64)}

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Pad to the batch's longest row; target_ids are the scored tokens (-100 elsewhere). Packed
        rows carry position ids instead of an attention mask: the padding at a row's end counts as
        one more example, which attends to nothing before it and is not scored."""
        tokenizer = self.tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id)
        scored, _ = pad_sequences(batch["scored"], 0)
        out = {"input_ids": input_ids, "target_ids": input_ids.masked_fill(scored == 0, PAD),
               "prompt_length": torch.tensor(np.asarray(batch["prompt_length"], dtype=np.int64))}
        if "position_ids" in batch:
            positions = torch.arange(input_ids.shape[1]).repeat(len(input_ids), 1)
            for row, given in enumerate(batch["position_ids"]):
                positions[row, : len(given)] = torch.as_tensor(given)
                positions[row, len(given):] -= len(given)  # the padding restarts at 0: an example of its own
            out["position_ids"] = positions
        else:
            out["attention_mask"] = attention_mask
        for key in ("labels", "question", "correct"):
            if key in batch:
                out[key] = torch.tensor(np.asarray(batch[key]))
        return out

    # -- the model

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

    def logits(self, model, batch) -> torch.Tensor:
        """[B, T, V]; no KV cache (transformers reads packed position ids only without one)."""
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                     use_cache=False).logits

    def forward(self, model, batch):
        """Next-token loss; in eval mode, with max_new_tokens, also the greedy answers to the rows' prompts."""
        loss, sums = next_token_loss(self.logits(model, batch), batch["target_ids"])
        answers = self.generate(model, batch) if not model.training and self.generating() else None
        return loss, (*sums, answers)

    def generating(self) -> bool:
        return self.options.max_new_tokens > 0

    def sequence_nll(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the summed NLL of its scored tokens [B] and their count [B]."""
        losses, scored = token_nll(self.logits(model, batch), batch["target_ids"])
        return losses.sum(1), scored.sum(1)

    @torch.no_grad()
    def generate(self, model, batch, max_new_tokens: int | None = None) -> list[np.ndarray]:
        """Greedy answers (token ids, up to the end of sequence) to the prompts of the batch's rows
        with a prompt length, left-padded and decoded together with the KV cache. Under ZeRO-3 a
        rank keeps stepping, its rows finished, until every rank's have (every forward gathers)."""
        tokenizer = self.tokenizer()
        limit = max_new_tokens or self.options.max_new_tokens
        rows = [row for row in range(len(batch["input_ids"])) if int(batch["prompt_length"][row]) > 0]
        prompts = [batch["input_ids"][row, : int(batch["prompt_length"][row])] for row in rows] or [batch["input_ids"][0, :1]]
        width = max(len(prompt) for prompt in prompts)
        device = batch["input_ids"].device
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):], mask[i, width - len(prompt):] = prompt, 1
        finished = torch.full((len(prompts),), not rows, dtype=torch.bool, device=device)  # no prompt here: step along, finished
        answers = torch.zeros((len(prompts), 0), dtype=torch.long, device=device)
        step_ids, positions, cache = ids, (mask.cumsum(-1) - 1).clamp(min=0), None
        for _ in range(limit):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache = out.past_key_values
            next_token = out.logits[:, -1].argmax(-1).masked_fill(finished, pad_id)
            answers = torch.cat([answers, next_token[:, None]], 1)
            finished |= next_token == tokenizer.eos_token_id
            if all_ranks_finished(finished, model):
                break
            step_ids, positions = next_token[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        results = []
        for i in range(len(rows)):
            answer = answers[i].tolist()
            cut = answer.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in answer else len(answer) - 1
            results.append(np.asarray(answer[: cut + 1], dtype=np.int64))
        return results

    def embed(self, model, batch) -> torch.Tensor:
        """Mean-pooled last hidden states [B, H] (after the final norm); logits only for the last position."""
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True, logits_to_keep=1)
        return mean_pool(outputs.hidden_states[-1], batch["attention_mask"])

    def new_metrics(self) -> CausalLMMetrics:
        return CausalLMMetrics(self.tokenizer(), self.generating() and self.options.format != "text")

    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer().save_pretrained(directory)
