"""Convert a CTranslate2 Whisper model (``model.bin``, spec version 6) to a transformers
``WhisperForConditionalGeneration`` directory (``config.json``, ``model.safetensors``, tokenizer).

CTranslate2's ``model.bin`` (its ``ModelSpec._serialize``) is little-endian: uint32 binary version,
string spec name, uint32 revision, uint32 variable count, then per variable a string name, uint8
rank, uint32 dims, uint8 dtype id, uint32 byte count and the raw bytes; then uint32 alias count and
(alias, target) string pairs. A string is a uint16 length (with the NUL), the UTF-8 bytes and a NUL.
CT2 fuses self-attention q/k/v (``linear_0``, in that order) and cross-attention k/v
(``attention/linear_1``); its k biases are zero, and HF's ``k_proj`` has none.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from raytune_ft.models import save_directory_atomically

CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}

# Whisper tiny.en: what config.json of a faster-whisper export does not carry.
TINY_EN = dict(
    vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
    encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
    max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257,
    bos_token_id=50257, eos_token_id=50256, pad_token_id=50256, begin_suppress_tokens=[220, 50256],
)
NO_TIMESTAMPS = 50362


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a CT2 ``model.bin`` by name (aliases resolved), as numpy arrays."""
    data = Path(path).read_bytes()
    position = 0

    def number(fmt: str) -> int:
        nonlocal position
        (value,) = struct.unpack_from("<" + fmt, data, position)
        position += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal position
        length = number("H")
        text = data[position:position + length - 1].decode()
        position += length
        return text

    version = number("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows 6")
    string(), number("I")  # spec name, revision
    variables = {}
    for _ in range(number("I")):
        name = string()
        shape = [number("I") for _ in range(number("B"))]
        dtype, size = CT2_DTYPES[number("B")], number("I")
        variables[name] = np.frombuffer(data, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=position).reshape(shape)
        position += size
    for _ in range(number("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def _attention(out: dict, prefix: str, ct2: dict, scope: str, fused_qkv: bool) -> None:
    """One attention block: q/k/v/out projections of ``prefix`` from a CT2 ``scope``."""
    def take(name: str) -> np.ndarray:
        return ct2[f"{scope}/{name}"]

    if fused_qkv:
        weights, biases = np.split(take("linear_0/weight"), 3), np.split(take("linear_0/bias"), 3)
        output = "linear_1"
    else:
        weights = [take("linear_0/weight"), *np.split(take("linear_1/weight"), 2)]
        biases = [take("linear_0/bias"), *np.split(take("linear_1/bias"), 2)]
        output = "linear_2"
    for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
        out[f"{prefix}.{name}.weight"] = weight
        if name != "k_proj":
            out[f"{prefix}.{name}.bias"] = bias
    out[f"{prefix}.out_proj.weight"], out[f"{prefix}.out_proj.bias"] = take(f"{output}/weight"), take(f"{output}/bias")


def _norm(out: dict, prefix: str, ct2: dict, scope: str) -> None:
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = ct2[f"{scope}/gamma"], ct2[f"{scope}/beta"]


def _ffn(out: dict, prefix: str, ct2: dict, scope: str) -> None:
    for hf, ct in (("fc1", "linear_0"), ("fc2", "linear_1")):
        out[f"{prefix}.{hf}.weight"], out[f"{prefix}.{hf}.bias"] = ct2[f"{scope}/{ct}/weight"], ct2[f"{scope}/{ct}/bias"]
    _norm(out, f"{prefix}.final_layer_norm", ct2, f"{scope}/layer_norm")


def hf_state_dict(ct2: dict[str, np.ndarray], layers: int) -> dict[str, torch.Tensor]:
    """CT2 Whisper variables -> WhisperForConditionalGeneration tensors (float32)."""
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"], out[f"model.encoder.{conv}.bias"] = ct2[f"encoder/{conv}/weight"], ct2[f"encoder/{conv}/bias"]
    out["model.encoder.embed_positions.weight"] = ct2["encoder/position_encodings/encodings"]
    out["model.decoder.embed_positions.weight"] = ct2["decoder/position_encodings/encodings"]
    out["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    _norm(out, "model.encoder.layer_norm", ct2, "encoder/layer_norm")
    _norm(out, "model.decoder.layer_norm", ct2, "decoder/layer_norm")
    for i in range(layers):
        encoder, scope = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        _attention(out, f"{encoder}.self_attn", ct2, f"{scope}/self_attention", fused_qkv=True)
        _norm(out, f"{encoder}.self_attn_layer_norm", ct2, f"{scope}/self_attention/layer_norm")
        _ffn(out, encoder, ct2, f"{scope}/ffn")
        decoder, scope = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        _attention(out, f"{decoder}.self_attn", ct2, f"{scope}/self_attention", fused_qkv=True)
        _norm(out, f"{decoder}.self_attn_layer_norm", ct2, f"{scope}/self_attention/layer_norm")
        _attention(out, f"{decoder}.encoder_attn", ct2, f"{scope}/attention", fused_qkv=False)
        _norm(out, f"{decoder}.encoder_attn_layer_norm", ct2, f"{scope}/attention/layer_norm")
        _ffn(out, decoder, ct2, f"{scope}/ffn")
    return {key: torch.from_numpy(np.array(value, dtype=np.float32)) for key, value in out.items()}


def convert(source: str | Path, target: str | Path) -> Path:
    """A faster-whisper tiny.en directory -> a HF Whisper directory at ``target`` (written
    atomically: see ``save_directory_atomically``)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    source, target = Path(source), Path(target)
    ct2 = read_ct2(source / "model.bin")
    extra = json.loads((source / "config.json").read_text())
    config = WhisperConfig(**TINY_EN, suppress_tokens=extra["suppress_ids"], forced_decoder_ids=None)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = hf_state_dict(ct2, config.decoder_layers)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if [key for key in missing if key != "proj_out.weight"] or unexpected:
        raise ValueError(f"{source}: conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()  # proj_out shares the token embeddings (CT2 stores it as an alias)
    model.generation_config.no_timestamps_token_id = NO_TIMESTAMPS

    def save(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        WhisperTokenizerFast(tokenizer_file=str(source / "tokenizer.json")).save_pretrained(directory)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(directory)

    return save_directory_atomically(target, save)
