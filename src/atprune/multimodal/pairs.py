"""Image-text pairs: a JSONL file of ``{"image": path, "text": str}`` records, read and checked before any model is
loaded, and turned into model feeds with the model's own processor.

An image path is relative to the JSONL file's folder unless absolute. The text is what the language model reads
after the image: a caption, or any text. Where it does not already contain the processor's image placeholder, the
placeholder is put before it (:func:`image_prompt`), so the processor expands it into the image tokens the vision
tower's features replace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atprune.errors import ConfigError

PAIR_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class Pair:
    """One image-text pair: the image file and the text."""

    image: Path
    text: str


def is_pairs_file(spec: str | None) -> bool:
    """Whether a data spec is an image-text JSONL: a ``.jsonl`` file whose first record has an ``image`` key."""
    if not spec or not str(spec).lower().endswith(PAIR_SUFFIXES):
        return False
    path = Path(spec).expanduser()
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "image" in first
    return False


def read_pairs(spec: str, limit: int | None = None) -> list[Pair]:
    """Read and check an image-text JSONL (cheap: image headers only, no pixel decoding).

    Args:
        spec: path of the ``.jsonl`` file.
        limit: keep the first ``limit`` pairs (None: all).

    Returns:
        The pairs, in file order.

    Raises:
        ConfigError: the file is missing or empty; a line is not a JSON object with a string ``image`` and a
            non-empty string ``text``; an image file is missing or is not an image PIL can open (the message gives
            the line number and the path).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"image-text file not found: {spec}")
    pairs: list[Pair] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{spec} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(rec.get("text"), str) \
                    or not rec["text"].strip():
                raise ConfigError(f"{spec} line {number}: each line must be {{\"image\": path, \"text\": non-empty "
                                  "string}")
            image = Path(rec["image"]).expanduser()
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise ConfigError(f"{spec} line {number}: image not found: {image}")
            try:
                with Image.open(image) as im:
                    im.size  # reads the header only
            except (UnidentifiedImageError, OSError) as err:
                raise ConfigError(f"{spec} line {number}: {image} is not a readable image ({err})") from None
            pairs.append(Pair(image, rec["text"]))
    if not pairs:
        raise ConfigError(f"{spec} holds no image-text pairs")
    return pairs


def image_prompt(processor) -> str:
    """The text a processor expands into one image's tokens: Gemma 3's ``<start_of_image>`` (``boi_token``),
    Qwen2-VL's ``<|vision_start|><|image_pad|><|vision_end|>`` (its rotary index looks for the start token), and
    the ``image_token`` of every other processor (LLaVA, LLaVA-NeXT ``<image>``; Idefics3 / SmolVLM ``<image>``).

    Raises:
        ConfigError: the processor has no image token (not a vision-language processor).
    """
    if getattr(processor, "boi_token", None):
        return processor.boi_token
    token = getattr(processor, "image_token", None)
    if not token:
        raise ConfigError(f"{type(processor).__name__} has no image token; image-text data needs the processor of a "
                          "vision-language model")
    if token == "<|image_pad|>":
        return f"<|vision_start|>{token}<|vision_end|>"
    return token


@dataclass
class ImageTextCalibration:
    """Calibration feeds for a vision-language model: one dict of model inputs per pair (the processor's
    ``input_ids`` ``[1, tokens]`` int64, ``attention_mask``, ``pixel_values`` and the class's own extras, e.g.
    ``image_grid_thw``), run through the whole model by :func:`atprune.engine.passes.first_block_inputs`."""

    feeds: list[dict]
    info: dict = field(default_factory=dict)


def feed(processor, pair: Pair, max_text_tokens: int | None = None) -> dict:
    """The processor's model inputs (tensors, batch of 1) for one pair: image prompt + text, the text cut to its
    first ``max_text_tokens`` tokens."""
    from PIL import Image

    text = pair.text
    if max_text_tokens is not None:
        tok = getattr(processor, "tokenizer", processor)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_text_tokens:
            text = tok.decode(ids[:max_text_tokens])
    prompt = image_prompt(processor)
    if prompt not in text:
        text = prompt + text
    with Image.open(pair.image) as im:
        rgb = im.convert("RGB")
    out = processor(images=[rgb], text=[text], return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def image_text_calibration(processor, pairs: list[Pair], max_text_tokens: int | None = None,
                           source: str | None = None) -> ImageTextCalibration:
    """:class:`ImageTextCalibration` of ``pairs``, with ``info`` (source, pairs, tokens, image tokens) for the
    report."""
    feeds = [feed(processor, p, max_text_tokens) for p in pairs]
    tokens = sum(int(f["input_ids"].numel()) for f in feeds)
    image_id = getattr(processor, "image_token_id", None)
    image_tokens = sum(int((f["input_ids"] == image_id).sum()) for f in feeds) if image_id is not None else None
    return ImageTextCalibration(feeds, {"dataset": "image-text pairs", "origin": source, "nsamples": len(feeds),
                                        "tokens": tokens, "image_tokens": image_tokens,
                                        "seqlen": max(int(f["input_ids"].shape[1]) for f in feeds),  # the longest
                                        "max_text_tokens": max_text_tokens})
