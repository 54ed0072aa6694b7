"""Offline tokenizer and processor files for the random-weight Qwen3-VL presets.

A preset folder gets the same *kind* of preprocessing files as a published ``Qwen/Qwen3-VL-*-Instruct``
folder, generated here without any download:

* ``tokenizer.json``: a Qwen2-style byte-level BPE (NFC normalizer, Qwen2's split regex, ByteLevel pre-tokenizer,
  post-processor and decoder), trained deterministically on the small English corpus in ``corpus.txt``, so that
  ordinary prompts take a sensible number of tokens. The BPE part holds the 256 byte symbols plus merges and stays
  strictly below the first special id; the 26 Qwen special tokens (:data:`merge.presets.shapes.SPECIAL_TOKENS`) get
  exactly the ids the config names (``image_token_id`` and friends), which for the published shapes leaves a gap
  of unused ids between the BPE part and 151643. The special tokens are also entries of the BPE model's vocab with
  those ids: that is what makes both ``tokenizers`` and ``transformers`` (which rebuilds the BPE from the vocab and
  merges) keep the explicit ids instead of renumbering the added tokens contiguously.
* ``tokenizer_config.json`` (``Qwen2Tokenizer``; which tokens are special, eos ``<|im_end|>``, pad
  ``<|endoftext|>``), ``chat_template.jinja`` (Qwen3-VL-Instruct's template), ``preprocessor_config.json`` and
  ``video_preprocessor_config.json`` (Qwen3-VL's values with the config's patch/merge sizes) and
  ``generation_config.json`` (greedy).

Only the ``tokenizers`` library is needed (to train the BPE); the chat template and the training text are
data files beside this module.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

from .shapes import SPECIAL_TOKENS, special_token_ids

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Special tokens that Qwen3's tokenizer_config marks ``special: true``; the rest of SPECIAL_TOKENS (tool call,
# FIM, repo, tool response and think markers) are added tokens that are not special.
QWEN_SPECIAL_FLAGGED: tuple[str, ...] = SPECIAL_TOKENS[: SPECIAL_TOKENS.index("<|video_pad|>") + 1]
# tokenizer_config's ``additional_special_tokens``: the special ones other than <|endoftext|> (the pad token).
QWEN_ADDITIONAL_SPECIAL: tuple[str, ...] = QWEN_SPECIAL_FLAGGED[1:]

# Cap on the trained BPE part (byte alphabet + merges); the corpus runs out of frequent pairs before this.
BPE_VOCAB_LIMIT = 4096
BPE_MIN_FREQUENCY = 2
MODEL_MAX_LENGTH = 262144

# Qwen3-VL's preprocessing constants (published preprocessor_config.json / video_preprocessor_config.json).
IMAGE_MIN_PIXELS = 65536
IMAGE_MAX_PIXELS = 16777216
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

# Written so that ``transformers`` 4.x and 5.x both resolve it: 5.x maps it to Qwen2VLImageProcessor (torchvision)
# or Qwen2VLImageProcessorPil, whichever backend is installed.
IMAGE_PROCESSOR_TYPE = "Qwen2VLImageProcessor"
VIDEO_PROCESSOR_TYPE = "Qwen3VLVideoProcessor"
PROCESSOR_CLASS = "Qwen3VLProcessor"

# Data files beside this module: Qwen3-VL-Instruct's chat template (no default system prompt; images and videos
# render as vision-start, one pad token, vision-end, which the processor expands; tool calls in Qwen's
# <tool_call> JSON format), and the BPE's training text (plain English about pictures, colours, animals,
# places and numbers, plus the words of the chat format, so that typical prompts become a handful of tokens).
DATA = pathlib.Path(__file__).resolve().parent
CHAT_TEMPLATE_PATH = DATA / "chat_template.jinja"
CORPUS_PATH = DATA / "corpus.txt"


def _special_base(config: dict) -> int:
    base = int(config["image_token_id"]) - SPECIAL_TOKENS.index("<|image_pad|>")
    ids = special_token_ids(base)
    for key, token in (
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        if key in config and int(config[key]) != ids[token]:
            raise ValueError(f"config {key}={config[key]} does not match {token}={ids[token]} (special base {base})")
    vocab_size = int(config["text_config"]["vocab_size"])
    if base < 256 + 1 or base + len(SPECIAL_TOKENS) > vocab_size:
        raise ValueError(f"special ids {base}..{base + len(SPECIAL_TOKENS) - 1} do not fit the vocab of {vocab_size}")
    return base


def _train_bpe(vocab_limit: int) -> tuple[dict[str, int], list[list[str]]]:
    """Train the byte-level BPE on ``corpus.txt``; returns (vocab ordered by id, merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix=""))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_limit,
        min_frequency=BPE_MIN_FREQUENCY,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # One paragraph per training sequence, in corpus order.
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    paragraphs = [p.strip() + "\n" for p in corpus.split("\n\n") if p.strip()]
    tokenizer.train_from_iterator(paragraphs, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > vocab_limit:
        raise RuntimeError(f"unexpected BPE vocab layout: {len(vocab)} ids for a limit of {vocab_limit}")
    return vocab, merges


def _added_token(content: str, token_id: int, special: bool) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _byte_level(**extra: Any) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False, **extra}


def build_tokenizer_json(config: dict) -> dict:
    """The ``tokenizer.json`` dictionary for ``config`` (BPE below the special base, specials at their ids)."""
    base = _special_base(config)
    vocab, merges = _train_bpe(min(base, BPE_VOCAB_LIMIT))
    special_ids = special_token_ids(base)
    full_vocab = dict(vocab)
    for token, token_id in special_ids.items():
        if token in full_vocab:
            raise RuntimeError(f"special token {token!r} was learned by the BPE")
        full_vocab[token] = token_id
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            _added_token(token, token_id, token in QWEN_SPECIAL_FLAGGED) for token, token_id in special_ids.items()
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
                _byte_level(),
            ],
        },
        "post_processor": _byte_level(),
        "decoder": _byte_level(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": full_vocab,
            "merges": merges,
        },
    }


def build_tokenizer_config(config: dict) -> dict:
    """``tokenizer_config.json`` in the published Qwen3-VL layout (read by transformers 4.x and 5.x)."""
    special_ids = special_token_ids(_special_base(config))
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                k: v for k, v in _added_token(token, token_id, token in QWEN_SPECIAL_FLAGGED).items() if k != "id"
            }
            for token, token_id in special_ids.items()
        },
        "additional_special_tokens": list(QWEN_ADDITIONAL_SPECIAL),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "processor_class": PROCESSOR_CLASS,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _vision_sizes(config: dict) -> dict:
    vision = config["vision_config"]
    return {
        "patch_size": int(vision["patch_size"]),
        "temporal_patch_size": int(vision["temporal_patch_size"]),
        "merge_size": int(vision["spatial_merge_size"]),
    }


def build_preprocessor_config(config: dict) -> dict:
    """``preprocessor_config.json``: Qwen3-VL's image processing with the config's patch and merge sizes."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_processor_type": IMAGE_PROCESSOR_TYPE,
        "image_std": list(IMAGE_STD),
        **_vision_sizes(config),
        "processor_class": PROCESSOR_CLASS,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": IMAGE_MAX_PIXELS, "shortest_edge": IMAGE_MIN_PIXELS},
    }


def build_video_preprocessor_config(config: dict) -> dict:
    """``video_preprocessor_config.json`` (used only where torchvision is installed).

    Only the model-tied values are written; frame sampling and pixel budgets are left to the installed
    ``Qwen3VLVideoProcessor`` defaults.
    """
    return {
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        **_vision_sizes(config),
        "processor_class": PROCESSOR_CLASS,
        "video_processor_type": VIDEO_PROCESSOR_TYPE,
    }


def build_generation_config(config: dict) -> dict:
    """``generation_config.json``: greedy decoding that stops at <|im_end|> or <|endoftext|>."""
    special_ids = special_token_ids(_special_base(config))
    return {
        "bos_token_id": special_ids["<|endoftext|>"],
        "do_sample": False,
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        "pad_token_id": special_ids["<|endoftext|>"],
    }


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_and_processor(folder: pathlib.Path, config: dict) -> None:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json,
    video_preprocessor_config.json and generation_config.json into ``folder``.

    Offline and deterministic (the same config gives byte-identical files). ``config`` is a Qwen3-VL
    ``config.json`` dictionary: the special ids come from its ``image_token_id`` (checked against the other vision
    token ids and ``text_config.vocab_size``), the patch sizes from its ``vision_config``.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_json = build_tokenizer_json(config)
    n_bpe = len(tokenizer_json["model"]["vocab"]) - len(SPECIAL_TOKENS)
    _write_json(folder / "tokenizer.json", tokenizer_json)
    _write_json(folder / "tokenizer_config.json", build_tokenizer_config(config))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE_PATH.read_text(encoding="utf-8"), encoding="utf-8")
    _write_json(folder / "preprocessor_config.json", build_preprocessor_config(config))
    _write_json(folder / "video_preprocessor_config.json", build_video_preprocessor_config(config))
    _write_json(folder / "generation_config.json", build_generation_config(config))
    logger.info(
        "wrote tokenizer (%d BPE ids, %d merges, specials at %d) and processor files to %s",
        n_bpe,
        len(tokenizer_json["model"]["merges"]),
        _special_base(config),
        folder,
    )
