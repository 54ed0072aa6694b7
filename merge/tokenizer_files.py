"""Offline tokenizer and image-processor files for the random-weight Qwen3-VL presets.

A preset folder gets the same *kind* of preprocessing files as a published ``Qwen/Qwen3-VL-*-Instruct``
folder, generated here without any download:

* ``tokenizer.json``: a Qwen2-style byte-level BPE (NFC normalizer, Qwen2's split regex, ByteLevel pre-tokenizer,
  post-processor and decoder), trained deterministically on the small English corpus embedded below, so that
  ordinary prompts take a sensible number of tokens. The BPE part holds the 256 byte symbols plus merges and stays
  strictly below the first special id; the 26 Qwen special tokens (:data:`merge.presets.SPECIAL_TOKENS`) get
  exactly the ids the config names (``image_token_id`` and friends), which for the published shapes leaves a gap
  of unused ids between the BPE part and 151643. The special tokens are also entries of the BPE model's vocab with
  those ids: that is what makes both ``tokenizers`` and ``transformers`` (which rebuilds the BPE from the vocab and
  merges) keep the explicit ids instead of renumbering the added tokens contiguously.
* ``tokenizer_config.json`` (``Qwen2Tokenizer``; which tokens are special, eos ``<|im_end|>``, pad
  ``<|endoftext|>``), ``chat_template.jinja`` (Qwen3-VL-Instruct's template), ``preprocessor_config.json`` and
  ``video_preprocessor_config.json`` (Qwen3-VL's values with the config's patch/merge sizes) and
  ``generation_config.json`` (greedy).

transformers' ``AutoProcessor`` for ``qwen3_vl`` needs torchvision (its video processor imports it), so
:func:`load_preprocessors` loads the tokenizer and the PIL-backend image processor separately and
:func:`build_inputs` / :func:`build_batch_inputs` reproduce what ``Qwen3VLProcessor.__call__`` does for images.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from merge.presets import SPECIAL_TOKENS, special_token_ids

if TYPE_CHECKING:
    from PIL import Image

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

# Qwen3-VL-Instruct's chat template: no default system prompt; images and videos render as vision-start, one
# pad token, vision-end (the processor expands the pad token); tool calls in Qwen's <tool_call> JSON format.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Training text for the BPE: plain English about pictures, colours, animals, places and numbers, plus the words
# of the chat format, so that typical prompts ("Describe this image.") become a handful of tokens.
TRAINING_CORPUS = """\
Describe this image. Describe the image in detail. What is in this picture? What do you see in the photo?
Please describe what is shown in the image, and explain what the people and animals are doing.
The image shows a small brown dog sitting on a green lawn next to a red ball. The dog is looking at the camera.
In the background there is a white house with a blue door, two windows and a large tree with yellow leaves.
The sky is clear and bright, with a few white clouds. The photo was probably taken on a sunny afternoon.

This picture shows a busy street in a city at night. There are many cars, buses and people walking on the
sidewalk. The lights of the shops and the signs are bright and colorful: red, orange, yellow, green, blue,
purple, pink, black, white and gray. A woman in a long black coat is holding an umbrella, and a man is riding
a bicycle across the road. The street is wet because it has been raining.

In the first image, a cat is sleeping on a soft chair near the window. In the second image, the same cat is
playing with a piece of string. The cat has orange fur with white paws and green eyes. Cats and dogs are the
most common pets, but some people also keep birds, fish, rabbits, horses and even snakes.

The chart in the image compares the number of visitors in each month of the year. January has the lowest
number, with about 1200 visitors, while July has the highest number, with more than 5400 visitors. The values
for March, April and May are close to each other. The total for the whole year is 38450, and the average per
month is about 3204. Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 25, 32, 50, 64, 100 and 1000
appear in the table, and the percentages are 10%, 25%, 50% and 75%.

A group of children are playing football in a park. One child is wearing a red shirt and another child is
wearing a blue shirt. Their parents are sitting on a bench under a tree and watching the game. There is a
small lake behind them with ducks and swans swimming in the water. On the left side of the picture there is
a path with flowers, and on the right side there is a playground with a slide and two swings.

The photograph shows a kitchen table with a plate of fruit: three apples, two bananas, an orange and a bunch
of grapes. Next to the plate there is a cup of coffee, a glass of water, a loaf of bread and a knife.
The light comes from a window on the left, so the shadows fall to the right. The colors are warm and natural.

Question: How many animals are in the picture? Answer: There are four animals in the picture: two horses,
one cow and one sheep. They are standing in a field near a wooden fence, and there are mountains with snow in
the distance. Question: What color is the car? Answer: The car is dark blue. Question: Where was this photo
taken? Answer: It looks like it was taken at the beach, because there is sand, water and a few boats.

The user asks the assistant a question about an image, and the assistant answers it clearly and briefly.
The system message tells the assistant to be helpful. You are a helpful assistant. Read the text in the
image and write it down. The sign says "Open from 9 to 5, Monday to Friday". The label on the bottle says
"Fresh orange juice, 1 liter". Count the objects, identify the colors and describe the scene step by step.

Large elephants walk slowly across the dry grass, and a young elephant follows its mother. A tall giraffe
eats leaves from the top of a tree. Lions rest in the shade while zebras drink from the river. Birds fly high
above the trees, and a monkey climbs up a branch. The animals live in a national park in Africa, where many
tourists come every year to take pictures of them.

The room is large and bright, with white walls, a wooden floor and a big window that looks out over the sea.
There is a gray sofa with three cushions, a low table with some books and a lamp, and a painting of a boat on
the wall. The image is in high resolution, so small details such as the pattern on the carpet are visible.

system
You are a helpful assistant.
user
Describe this image in one sentence.
assistant
A brown dog is running on the beach next to the water.
user
What is written on the sign?
assistant
The sign says "Welcome to the city museum".
user
How many people can you see?
assistant
I can see five people: three adults and two children.

The quick brown fox jumps over the lazy dog. Every morning, the old man walks his dog along the river and
buys a newspaper from the small shop at the corner. He likes to read about the weather, the news and the
sports results. Today it is cold and windy, but the sun is shining, and the forecast says that it will be
warmer tomorrow. People often talk about the weather, their work, their family and their plans for the
weekend, when they would like to visit friends, go shopping, cook dinner or watch a movie at home.

Objects in a picture can be big or small, near or far, old or new, light or dark. A careful description
should mention the main subject first, then the other objects, their position, their size, their shape and
their color, and finally the background and the light. For example: a round red apple on a square wooden
board, a tall glass bottle behind it, and a soft blue light coming from the right side of the image.
If the picture contains text, the description should also include the words that can be read.

Mathematics uses numbers and symbols. Two plus three equals five, ten minus four equals six, and seven times
eight equals 56. The area of a rectangle is its width times its height: a rectangle that is 64 pixels wide and
96 pixels high has an area of 6144 pixels. An image can be split into small square patches, for example
patches of 16 by 16 pixels, and each patch can be described by a list of numbers for the red, green and blue
values of its pixels. The first, second, third and last patches are counted from the top left corner.
"""


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
    """Train the byte-level BPE on :data:`TRAINING_CORPUS`; returns (vocab ordered by id, merges)."""
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
    paragraphs = [p.strip() + "\n" for p in TRAINING_CORPUS.split("\n\n") if p.strip()]
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
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
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


# --------------------------------------------------------------------------------------------------------------
# Loading and preprocessing without torchvision.


def load_preprocessors(folder: str | pathlib.Path, backend: str = "pil") -> tuple[Any, Any]:
    """(tokenizer, image processor) of a checkpoint folder, without torchvision.

    ``AutoProcessor`` would also build the Qwen3-VL *video* processor, which imports torchvision; this loads only
    the tokenizer (``Qwen2Tokenizer``) and the image processor (the ``"pil"`` backend by default, so that pixel
    values do not depend on whether torchvision happens to be installed).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    image_processor = AutoImageProcessor.from_pretrained(str(folder), backend=backend)
    return tokenizer, image_processor


def _patch_dim(config: dict) -> int:
    vision = config["vision_config"]
    return int(vision.get("in_channels", 3)) * int(vision["temporal_patch_size"]) * int(vision["patch_size"]) ** 2


def _chat_text(tokenizer: Any, prompt: str, n_images: int) -> str:
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _process_images(image_processor: Any, images: Sequence[Image.Image], config: dict) -> tuple[np.ndarray, ...]:
    if not images:
        return np.zeros((0, _patch_dim(config)), np.float32), np.zeros((0, 3), np.int64)
    out = image_processor(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def _expand_image_tokens(text: str, image_grid_thw: np.ndarray, merge_size: int, image_token: str) -> str:
    """``Qwen3VLProcessor``'s placeholder expansion: the i-th image token becomes prod(grid_thw[i]) // merge**2."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(image_grid_thw):
        raise ValueError(f"{len(pieces) - 1} {image_token} tokens in the text but {len(image_grid_thw)} images")
    merge_length = merge_size**2
    out = [pieces[0]]
    for grid, piece in zip(image_grid_thw, pieces[1:], strict=True):
        out.append(image_token * (int(np.prod(grid)) // merge_length))
        out.append(piece)
    return "".join(out)


def _encode_prompt(
    tokenizer: Any, image_processor: Any, prompt: str, images: Sequence[Image.Image], config: dict
) -> tuple[list[int], np.ndarray, np.ndarray]:
    image_token = "<|image_pad|>"
    image_token_id = int(config["image_token_id"])
    if tokenizer.convert_tokens_to_ids(image_token) != image_token_id:
        raise ValueError(
            f"tokenizer maps {image_token} to {tokenizer.convert_tokens_to_ids(image_token)}, "
            f"config says {image_token_id}"
        )
    pixel_values, image_grid_thw = _process_images(image_processor, images, config)
    text = _expand_image_tokens(
        _chat_text(tokenizer, prompt, len(images)), image_grid_thw, int(image_processor.merge_size), image_token
    )
    ids = tokenizer(text, add_special_tokens=True, return_token_type_ids=False)["input_ids"]
    return list(ids), pixel_values, image_grid_thw


def _mm_token_type_ids(input_ids: np.ndarray, config: dict) -> np.ndarray:
    types = np.zeros_like(input_ids)
    types[input_ids == int(config["image_token_id"])] = 1
    types[input_ids == int(config["video_token_id"])] = 2
    return types


def build_inputs(
    tokenizer: Any, image_processor: Any, prompt: str, images: Sequence[Image.Image], config: dict
) -> dict[str, np.ndarray]:
    """Model inputs for one user turn: the images (in order), then ``prompt``, then the assistant prompt.

    Same result as ``Qwen3VLProcessor(text=chat_template(...), images=images)``: ``input_ids`` and
    ``attention_mask`` int64 [1, S], ``pixel_values`` float32 [sum t*h*w, C*T*P*P] (``[0, C*T*P*P]`` without
    images), ``image_grid_thw`` int64 [n_images, 3] and ``mm_token_type_ids`` int64 [1, S] (1 at image tokens).
    """
    ids, pixel_values, image_grid_thw = _encode_prompt(tokenizer, image_processor, prompt, images, config)
    input_ids = np.asarray([ids], np.int64)
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw,
        "mm_token_type_ids": _mm_token_type_ids(input_ids, config),
    }


def build_batch_inputs(
    tokenizer: Any,
    image_processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    config: dict,
) -> dict[str, np.ndarray]:
    """:func:`build_inputs` for several prompts (``images[i]`` go with ``prompts[i]``), left-padded with the pad id.

    ``pixel_values`` and ``image_grid_thw`` are the concatenation over the batch, in prompt order.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token")
    encoded = [
        _encode_prompt(tokenizer, image_processor, p, imgs, config) for p, imgs in zip(prompts, images, strict=True)
    ]
    length = max((len(ids) for ids, _, _ in encoded), default=0)
    input_ids = np.full((len(encoded), length), int(pad_id), np.int64)
    attention_mask = np.zeros((len(encoded), length), np.int64)
    for row, (ids, _, _) in enumerate(encoded):
        if ids:
            input_ids[row, length - len(ids) :] = ids
            attention_mask[row, length - len(ids) :] = 1
    mm_types = _mm_token_type_ids(input_ids, config) * attention_mask
    if encoded:
        pixel_values = np.concatenate([pv for _, pv, _ in encoded], axis=0)
        image_grid_thw = np.concatenate([g for _, _, g in encoded], axis=0)
    else:
        pixel_values, image_grid_thw = _process_images(image_processor, [], config)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw,
        "mm_token_type_ids": mm_types,
    }
