"""Speech recognition (ASR) with a pretrained Whisper encoder-decoder (``asset:whisper-tiny-en``).

Rows have ``audio`` (WAV bytes, or a path or URI; FLAC/OGG with the optional soundfile package) and
``text`` (the transcript). Preprocessing decodes to 16 kHz mono, computes Whisper's log-mel
features (padded or cut to the model's window: 30 s for the real model) and tokenises
``<|startoftranscript|><|notimestamps|> text<|endoftext|>``. Training is teacher-forced
cross-entropy; evaluation (model in eval mode) also decodes greedily and scores WER and CER on
words normalised as Whisper's English normaliser does (case, punctuation, spellings, spelled-out
numbers as numerals: "seven two nine", "729" and "7, 2, 9" read alike), each digit a word.

There is no new head: ``head_names`` is the decoder (with its output projection, which Whisper
ties to the token embeddings), so ``head_only`` keeps the acoustic encoder as pretrained and
retrains the language side, where zero-shot errors on isolated words ("three" -> "Free") live;
training the projection alone would move the tied input embeddings anyway.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
from pydantic import ConfigDict, Field

from raytune_ft.errors import UserError
from raytune_ft.schema import Recipe, TaskOptions
from raytune_ft.tasks import all_ranks_finished, check_positions, check_pretrained_weights, load_dtype, register

SAMPLING_RATE = 16000
HOP_LENGTH = 160  # Whisper's mel frames are 10 ms apart; its encoder halves them (conv stride 2)
PAD = -100


@functools.cache
def english_normaliser():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})  # no British -> American spelling table: the asset model ships none


def normalise(text: str) -> list[str]:
    """Words for WER: Whisper's English normaliser (lower case, no punctuation, contractions and
    spelled-out numbers standardised), then each digit a word, so that a digit string counts the
    same however it was written ("seven two nine" -> 729 -> 7 2 9; "7, 2, 9" -> 7 2 9)."""
    return re.sub(r"\d", r" \g<0> ", english_normaliser()(text)).split()


def errors_and_length(reference: str, hypothesis: str, unit) -> tuple[int, int]:
    """(edits: substitutions + deletions + insertions, reference length) in words or characters:
    ``unit`` is jiwer.process_words or jiwer.process_characters."""
    counts = unit(reference, hypothesis)
    return counts.substitutions + counts.deletions + counts.insertions, counts.hits + counts.substitutions + counts.deletions


class SpeechMetrics:
    """Summed word/char edit distances and reference lengths, token loss and utterance count:
    WER and CER are total errors over total reference length (corpus-level, like sclite)."""

    names = ("loss", "wer", "cer", "word_accuracy", "count")
    retained = ("word_accuracy",)  # higher is better: what a retention ratio compares

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sums = torch.zeros(7, dtype=torch.float64)  # word errs, words, char errs, chars, loss, tokens, utterances

    def update(self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], batch: dict[str, torch.Tensor]) -> None:
        loss_sum, tokens, hypotheses = outputs
        self.sums[4] += float(loss_sum)
        self.sums[5] += float(tokens)
        self.sums[6] += len(batch["labels"])
        if hypotheses is None:
            return
        references = self.tokenizer.batch_decode([row[row != PAD].tolist() for row in batch["labels"].cpu()], skip_special_tokens=True)
        for reference, hypothesis in zip(references, self.tokenizer.batch_decode(hypotheses.cpu().tolist(), skip_special_tokens=True)):
            self.add(reference, hypothesis)

    def add(self, reference: str, hypothesis: str) -> None:
        """One utterance's counts; characters are those of the normalised words joined by spaces."""
        reference, hypothesis = " ".join(normalise(reference)), " ".join(normalise(hypothesis))
        self.sums[:4] += torch.tensor([*errors_and_length(reference, hypothesis, jiwer.process_words),
                                       *errors_and_length(reference, hypothesis, jiwer.process_characters)], dtype=torch.float64)

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        wer = float(state[0] / state[1].clamp(min=1))
        return {
            "loss": float(state[4] / state[5].clamp(min=1)),
            "wer": wer,
            "cer": float(state[2] / state[3].clamp(min=1)),
            "word_accuracy": max(0.0, 1.0 - wer),
            "count": int(state[6]),
        }


@register
class SpeechRecognition:
    name = "speech_recognition"
    columns = ("audio", "text")
    metrics = SpeechMetrics.names

    class Options(TaskOptions):
        model_config = ConfigDict(extra="forbid")
        max_label_tokens: int = Field(96, ge=4, le=448, description="transcript tokens kept (with the 3 special tokens); longer ones are cut")
        max_new_tokens: int = Field(64, ge=1, le=444, description="evaluation: greedy decoding stops after this many tokens")

    def __init__(self, recipe: Recipe, labels: list[str]):
        self.model_path, self.options = recipe.model.path, recipe.task
        self.dropout, self.skip_bad_rows, self.dtype = recipe.train.dropout, recipe.data.on_bad_rows == "skip", load_dtype(recipe)
        self._tokenizer = self._config = self._features = None

    def config(self):
        from transformers import WhisperConfig

        if self._config is None:
            path = Path(self.model_path)
            if not (path / "config.json").is_file():
                raise UserError("model.path", f"{path}: expected a Whisper model directory with config.json (e.g. asset:whisper-tiny-en)")
            self._config = WhisperConfig.from_pretrained(path)
            if self._config.model_type != "whisper":
                raise UserError("model.path", f"{path}/config.json: model_type {self._config.model_type!r} is not whisper")
            if self.dropout is not None:
                self._config.dropout = self.dropout
        return self._config

    def tokenizer(self):
        from transformers import WhisperTokenizerFast

        if self._tokenizer is None:
            if not (Path(self.model_path) / "tokenizer.json").is_file():
                raise UserError("model.path", f"{self.model_path}: no tokenizer.json (a Whisper tokenizer saved with the model)")
            self._tokenizer = WhisperTokenizerFast.from_pretrained(self.model_path)
        return self._tokenizer

    def special_tokens(self) -> tuple[int, int, int]:
        """(start of transcript, no timestamps, end of text) ids."""
        tokenizer = self.tokenizer()
        return (tokenizer.convert_tokens_to_ids("<|startoftranscript|>"), tokenizer.convert_tokens_to_ids("<|notimestamps|>"),
                tokenizer.convert_tokens_to_ids("<|endoftext|>"))

    def feature_extractor(self):
        """Whisper's log-mel front end, built locally for the model's window (30 s for the real
        model: its encoder takes exactly 2 x max_source_positions frames)."""
        from transformers import WhisperFeatureExtractor

        if self._features is None:
            config = self.config()
            seconds, rest = divmod(2 * config.max_source_positions * HOP_LENGTH, SAMPLING_RATE)
            if rest:
                raise UserError("model.path", f"max_source_positions {config.max_source_positions} is not a whole number of seconds (multiples of 50)")
            self._features = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLING_RATE,
                                                     hop_length=HOP_LENGTH, chunk_length=seconds)
        return self._features

    def check(self) -> None:
        """Driver-side: config, tokenizer and safetensors weights that fit the architecture; the
        transcript lengths fit the decoder's positions (decoding adds its 2 start tokens)."""
        positions = self.config().max_target_positions
        check_positions("task.max_label_tokens", self.options.max_label_tokens, positions, "decoder positions")
        check_positions("task.max_new_tokens", self.options.max_new_tokens, positions, "decoder positions", added=2)
        check_pretrained_weights(self.model_path, self.skeleton())
        self.tokenizer()
        self.feature_extractor()

    def skeleton(self) -> torch.nn.Module:
        from transformers import WhisperForConditionalGeneration

        with torch.device("meta"):
            return WhisperForConditionalGeneration(self.config())

    def build_model(self) -> torch.nn.Module:
        from transformers import WhisperForConditionalGeneration

        return WhisperForConditionalGeneration.from_pretrained(self.model_path, config=self.config(), dtype=self.dtype, use_safetensors=True)

    def head_names(self, model: torch.nn.Module) -> list[str]:
        return ["model.decoder", "proj_out"]

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Decode, featurise, tokenise (Ray Data map_batches): features [B, mels, frames] float16,
        tokens [B, max_label_tokens] int64 padded with -100."""
        from raytune_ft.data import audio

        clips, keep = [], []
        for row, data in enumerate(batch["audio"]):
            try:
                clips.append(audio.decode(data if isinstance(data, (bytes, str)) else bytes(data), SAMPLING_RATE))
                keep.append(row)
            except Exception as error:  # wave.Error, EOFError, ValueError, soundfile's errors, ...
                if not self.skip_bad_rows:
                    where = str(data) if isinstance(data, str) else f"audio of the row with text {str(batch['text'][row])[:60]!r}"
                    raise UserError(where, f"cannot decode audio ({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else 'corrupt'})") from None
        config, length = self.config(), self.options.max_label_tokens
        if clips:
            features = self.feature_extractor()(clips, sampling_rate=SAMPLING_RATE, return_tensors="np").input_features.astype(np.float16)
        else:
            features = np.zeros((0, config.num_mel_bins, 2 * config.max_source_positions), dtype=np.float16)
        start, no_timestamps, end = self.special_tokens()
        tokens = np.full((len(keep), length), PAD, dtype=np.int64)
        for i, row in enumerate(keep):
            ids = self.tokenizer().encode(" " + str(batch["text"][row]).strip(), add_special_tokens=False)[: length - 3]
            sequence = [start, no_timestamps, *ids, end]
            tokens[i, : len(sequence)] = sequence
        return {"features": features, "tokens": tokens}

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Teacher forcing: decoder inputs are the tokens, labels the tokens shifted left (the
        forced <|notimestamps|> and padding are not scored)."""
        tokens = torch.from_numpy(np.array(batch["tokens"]))
        longest = int((tokens != PAD).sum(1).max()) if len(tokens) else 2
        tokens = tokens[:, :longest]
        labels = tokens[:, 1:].clone()
        labels[:, 0] = PAD
        _, _, end = self.special_tokens()
        return {
            "input_features": torch.from_numpy(np.array(batch["features"])).float(),  # [B, mels, frames]
            "decoder_input_ids": tokens[:, :-1].masked_fill(tokens[:, :-1] == PAD, end),  # [B, T]
            "labels": labels,  # [B, T], -100 where not scored
        }

    def forward(self, model, batch):
        """Teacher-forced token cross-entropy; in eval mode also the greedy transcripts."""
        if model.training:
            logits = model(input_features=batch["input_features"], decoder_input_ids=batch["decoder_input_ids"]).logits
            hypotheses = None
        else:
            from transformers.modeling_outputs import BaseModelOutput

            whisper = getattr(model, "module", model)  # DDP / DeepSpeed; a LoRA (peft) model answers get_encoder too
            encoded = BaseModelOutput(last_hidden_state=whisper.get_encoder()(batch["input_features"]).last_hidden_state)
            logits = whisper(encoder_outputs=encoded, decoder_input_ids=batch["decoder_input_ids"]).logits
            hypotheses = self.greedy(whisper, encoded)
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=PAD, reduction="none")
        tokens = (batch["labels"] != PAD).sum()
        return losses.sum() / tokens.clamp(min=1), (losses.detach().sum(), tokens, hypotheses)

    @torch.no_grad()
    def greedy(self, whisper, encoded) -> torch.Tensor:
        """Greedy decoding with the KV cache: [B, <= 2 + max_new_tokens] token ids."""
        start, no_timestamps, end = self.special_tokens()
        count = encoded.last_hidden_state.shape[0]
        device = encoded.last_hidden_state.device
        tokens = torch.tensor([[start, no_timestamps]], device=device).repeat(count, 1)
        finished = torch.zeros(count, dtype=torch.bool, device=device)
        step_input, cache = tokens, None
        for _ in range(self.options.max_new_tokens):
            out = whisper(encoder_outputs=encoded, decoder_input_ids=step_input, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_token = out.logits[:, -1].argmax(-1).masked_fill(finished, end)
            tokens = torch.cat([tokens, next_token[:, None]], 1)
            finished |= next_token == end
            if all_ranks_finished(finished, whisper):
                break
            step_input = next_token[:, None]
        return tokens

    def embed(self, model, batch) -> torch.Tensor:
        """Mean-pooled encoder states [B, d_model] (over the whole padded window)."""
        whisper = getattr(model, "module", model)
        return whisper.model.encoder(batch["input_features"]).last_hidden_state.mean(1)

    def new_metrics(self) -> SpeechMetrics:
        return SpeechMetrics(self.tokenizer())

    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None:
        """A transformers Whisper directory: weights (safetensors), tokenizer, feature extractor."""
        model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer().save_pretrained(directory)
        self.feature_extractor().save_pretrained(directory)
