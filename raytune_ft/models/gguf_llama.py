"""Convert a llama-architecture GGUF file (llama.cpp's format, e.g. SmolLM2-135M-Instruct in Q4_1)
to a transformers ``LlamaForCausalLM`` directory (``config.json``, ``model.safetensors``, tokenizer).

The shapes and hyperparameters come from the file's ``llama.*`` metadata, the weights are
dequantised to float32 with the ``gguf`` package (any type it knows: Q4_1, Q8_0, F16, ...).
llama.cpp's converter permutes the rows of the q and k projections (for its rotary kernel, which
rotates adjacent pairs where transformers rotates the two halves of each head); ``unpermute``
undoes that. A file without ``output.weight`` ties the output projection to the token embeddings.

transformers' own GGUF loader cannot build SmolLM2's tokenizer (no mapping for the ``smollm``
pre-tokenizer), so the tokenizer is built here from the GGUF vocabulary and merges: byte-level
BPE, split into individual digits first for ``smollm``, the control tokens as special tokens and
the file's chat template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raytune_ft.errors import UserError
from raytune_ft.models import save_directory_atomically

# blk.N.<gguf name> -> model.layers.N.<transformers name>
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp's pre-tokenizer names -> what precedes byte-level BPE's own split (its GPT-2 regex).
PRE_TOKENIZERS = {"smollm": "digits", "gpt-2": None, "default": None}
SPECIAL_TOKEN_TYPES = (3, 4)  # control, user-defined: added tokens, never split by BPE


def read(path: str | Path):
    """The GGUF reader of ``path``, or a one-line error naming the file."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError) as error:  # a missing file, bad magic, truncated tensor data
        raise UserError(str(path), f"not a readable GGUF file ({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def decimal(value: float) -> float:
    """A float32 from the file as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{value:.7g}")


def llama_config(reader, path: str | Path):
    """A ``LlamaConfig`` from the file's ``llama.*`` metadata; any other architecture is refused."""
    from transformers import LlamaConfig

    architecture = metadata(reader, "general.architecture")
    if architecture != "llama":
        raise UserError(str(path), f"architecture {architecture!r} is not llama; only llama-architecture GGUF files are converted")

    def value(key: str, default=None):
        found = metadata(reader, f"llama.{key}", default)
        if found is None:
            raise UserError(str(path), f"no llama.{key} in the GGUF metadata")
        return found

    hidden, heads = value("embedding_length"), value("attention.head_count")
    names = {tensor.name for tensor in reader.tensors}
    return LlamaConfig(
        vocab_size=value("vocab_size", len(metadata(reader, "tokenizer.ggml.tokens", []))),
        hidden_size=hidden, intermediate_size=value("feed_forward_length"), num_hidden_layers=value("block_count"),
        num_attention_heads=heads, num_key_value_heads=value("attention.head_count_kv", heads),
        head_dim=value("rope.dimension_count", hidden // heads), max_position_embeddings=value("context_length"),
        rms_norm_eps=decimal(value("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": decimal(value("rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=metadata(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata(reader, "tokenizer.ggml.padding_token_id"),
    )


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, rows (0, 1, 2, 3, ...) were
    interleaved pairs; transformers wants the two halves [0, 2, 4, ... | 1, 3, 5, ...]."""
    rows, columns = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def dequantized(tensor) -> np.ndarray:
    """One GGUF tensor as float32, in transformers' [out, in] layout (GGUF lists dims reversed)."""
    from gguf.quants import dequantize

    return np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy: the reader's arrays map the file


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for an unknown tensor."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    return None


def hf_state_dict(reader, config, path: str | Path) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantised and renamed for ``LlamaForCausalLM`` (q/k unpermuted)."""
    state = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise UserError(str(path), f"tensor {tensor.name} has no place in a llama model")
        weight = dequantized(tensor)
        if name.endswith("q_proj.weight"):
            weight = unpermute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute(weight, config.num_key_value_heads)
        state[name] = torch.from_numpy(weight)
    return state


def build_tokenizer(reader, path: str | Path):
    """The file's byte-level BPE tokenizer as a transformers fast tokenizer (special tokens and
    chat template included), built from ``tokenizer.ggml.tokens`` / ``merges``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind, pre = metadata(reader, "tokenizer.ggml.model"), metadata(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(str(path), f"tokenizer model {kind!r}: only gpt2-style byte-level BPE tokenizers are converted")
    if pre not in PRE_TOKENIZERS:
        raise UserError(str(path), f"pre-tokenizer {pre!r} is not known here; known: {', '.join(PRE_TOKENIZERS)}")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    types = metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata(reader, "tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if PRE_TOKENIZERS[pre] == "digits" else byte_level
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, types) if kind in SPECIAL_TOKEN_TYPES])

    def token(key: str) -> str | None:
        index = metadata(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
        pad_token=token("padding"), chat_template=metadata(reader, "tokenizer.chat_template"),
        model_max_length=metadata(reader, "llama.context_length", 2048), add_bos_token=False,
    )


def convert(source: str | Path, target: str | Path) -> Path:
    """A llama GGUF file -> a transformers directory at ``target`` (written atomically: see
    ``save_directory_atomically``)."""
    from transformers import LlamaForCausalLM

    source, target = Path(source), Path(target)
    reader = read(source)
    config = llama_config(reader, source)
    tokenizer = build_tokenizer(reader, source)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(hf_state_dict(reader, config, source), strict=False, assign=True)
    if [key for key in missing if not (key == "lm_head.weight" and config.tie_word_embeddings)] or unexpected:
        raise UserError(str(source), f"tensors do not fit the llama config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()

    def save(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    return save_directory_atomically(target, save)
