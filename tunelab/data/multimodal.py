"""Images in a record and in a row: the one place that finds them, for multimodal training (LLaVA-style).

    split_images(record, fmt="auto", where="record")
    -> {"messages": [Message, ...], "images": [reference, ...], "tools"?: [...]}

The messages are canonical (`tunelab.data.formats.normalise`) with one ``<image>`` placeholder where each image goes,
in the order of ``images``. A reference is what the record gives: a path or URL string (or, from parquet, the
image's own data). Shapes read:

* LLaVA JSON: ``{"image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``;
* LLaMA-Factory (mllm_demo): ``{"messages": [...], "images": ["a.jpg", ...]}`` with ``<image>`` in the text;
* content parts: OpenAI ``{"type": "image_url", "image_url": {"url": ...}}``, LLaMA-Factory v1
  ``{"type": "image_url", "value": ...}``, Hugging Face ``{"type": "image"}`` (the picture in ``images``).

`expand_image_tokens` turns an encoded sample into its row: each ``<image>`` (one token) becomes as many image
tokens as the vision tower gives features for one image, labelled -100, and the row lists its images in order.

A text-only run refuses all of these (`tunelab.data.formats.normalise` with no image list): the text would be
trained and the pictures it talks about dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tunelab.data.encode import IGNORE_INDEX, Encoded, finish_row
from tunelab.data.formats import detect_format, normalise
from tunelab.data.messages import IMAGE_PLACEHOLDER, fail
from tunelab.errors import TunelabError

IMAGE_TOKEN = IMAGE_PLACEHOLDER
# config.json model_type -> the vision tower family; a whole CLIP / SigLIP folder (text and vision) gives its vision half
VISION_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}


def split_images(record: Any, fmt: str = "auto", where: str = "record", *, reply_needed: bool = True) -> dict:
    """The record's messages with <image> placeholders, and its image references in placeholder order.
    `reply_needed`: False reads a conversation that ends before its reply too (`tunelab predict`'s prompts)."""
    if fmt == "auto":
        fmt = detect_format(record)
        if fmt is None:
            raise fail(where, "cannot tell the data format of this record", "Use the LLaVA, messages or sharegpt "
                       "shape (see tunelab.data.multimodal).")
    for key in ("videos", "video", "audios", "audio"):
        if isinstance(record, dict) and record.get(key):
            raise fail(where, f"the record has {key!r}", "Multimodal training reads images only: remove "
                       f"{key!r} and its placeholders.")
    inline: list = []
    sample = normalise({k: v for k, v in record.items() if k not in ("images", "image")}
                       if isinstance(record, dict) else record, fmt, where, images=inline, reply_needed=reply_needed)
    if "messages" not in sample:  # pretraining text: no turn for a picture to go with
        raise fail(where, "pretraining text with images", "Images go with a conversation (a question about them): "
                   "use the LLaVA, messages or sharegpt shape, or drop the images.")
    listed = record.get("images", record.get("image")) if isinstance(record, dict) else None
    listed = [] if listed in (None, "") else listed if isinstance(listed, list) else [listed]
    if listed and any(ref is not None for ref in inline):
        raise fail(where, "images are given both inside the messages and in 'images'",
                   "Give each image once: as a content part, or as a <image> placeholder with its file in 'images'.")
    if inline and listed:  # {"type": "image"} parts whose pictures are in 'images', in order
        if len(inline) != len(listed):
            raise fail(where, f"{len(inline)} image parts but {len(listed)} entries in 'images'",
                       "Give one 'images' entry per image part.")
        images = listed
    else:
        images = inline or listed
    if any(ref is None for ref in images):
        raise fail(where, "an image part names no picture (a bare {\"type\": \"image\"})",
                   "Give the pictures in 'images', one per image part, in order.")
    if any(m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"] for m in sample["messages"]):
        # the reply would be trained to follow a picture the model cannot write, and chat never shows it one there
        raise fail(where, "an image in an assistant reply", "Images go in a user turn (the question about them): "
                   "move <image> and its picture there, or check that the roles are not swapped.")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in sample["messages"])
    if placeholders != len(images):
        raise fail(where, f"{placeholders} <image> placeholders in the text but {len(images)} images",
                   "Put one <image> in the text where each image goes (LLaVA: '<image>\\n' before the first "
                   "question).")
    return {**sample, "images": images}


# --- image tokens ---------------------------------------------------------------------------------------------

def vision_family(path: str | Path, key: str = "visual_encoder_name_or_path") -> str:
    """'clip' or 'siglip' for a vision model (a folder or a hub id); a TunelabError naming the setting otherwise."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(str(path))
    except (OSError, ValueError) as exc:
        raise TunelabError(f"{key} = {str(path)!r}: no model config found there ({str(exc).splitlines()[0]}). Point "
                           "it at a CLIP or SigLIP model folder (e.g. a download of "
                           "openai/clip-vit-large-patch14-336).") from None
    model_type = config.get("model_type")
    if model_type not in VISION_TYPES:
        raise TunelabError(f"{key} = {str(path)!r} is a {model_type!r} model; the vision tower must be a CLIP or "
                           f"SigLIP model (model_type one of {', '.join(VISION_TYPES)}).")
    return VISION_TYPES[model_type]


def vision_config(path: str | Path, key: str = "visual_encoder_name_or_path"):
    """The config of the vision model in a folder (the vision half of a whole CLIP / SigLIP folder)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if vision_family(path, key) == "clip" else SiglipVisionConfig
    return cls.from_pretrained(str(path))


def image_seq_length(config, strategy: str) -> int:
    """Image tokens one image becomes: a token per patch, plus CLIP's CLS token when it is kept ('full')."""
    patches = (config.image_size // config.patch_size) ** 2
    return patches + (1 if config.model_type.startswith("clip") and strategy == "full" else 0)


@dataclass(frozen=True)
class ImageTokens:
    """How images appear in a multimodal run's rows."""

    token_id: int
    """The <image> token's id (added to the tokenizer)."""
    per_image: int
    """Tokens one image becomes (the vision tower's features for it)."""


def image_tokens(cfg, tokenizer) -> Optional[ImageTokens]:
    """The run's ImageTokens (adding <image> to `tokenizer`), or None for a text-only run (no vision tower)."""
    path = getattr(cfg, "visual_encoder_name_or_path", None)
    if not path:
        return None
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    return ImageTokens(add_image_token(tokenizer), image_seq_length(vision_config(path), strategy))


def add_image_token(tokenizer) -> int:
    """Add <image> to the tokenizer as a special token (as HF's LLaVA checkpoints have it) and return its id."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


# --- rows ------------------------------------------------------------------------------------------------------

def expand_image_tokens(encoded: Encoded, images: list[str], image_token_id: int, tokens_per_image: int,
                        max_length: int, where: str) -> Encoded:
    """A sample encoded whole (one image token per <image>) -> its row with each image token repeated
    `tokens_per_image` times (label -100: no position is trained to predict an image token), cut at max_length.

    A cut never splits an image: it falls before the first image that does not fit whole, and the row keeps the
    images before it (``row["images"]``). The row's first label is -100 and a row left with no trained token is
    dropped (None), as for text (`tunelab.data.encode.finish_row`)."""
    full_length = encoded.full_length + len(images) * (tokens_per_image - 1)
    if encoded.row is None:
        return Encoded(None, full_length)
    ids, labels = encoded.row["input_ids"], encoded.row["labels"]
    spans = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(spans) != len(images):
        raise TunelabError(f"{where}: the rendered conversation holds {len(spans)} image tokens for {len(images)} "
                           f"images: does the template or the system prompt write {IMAGE_PLACEHOLDER!r} itself? "
                           f"Remove it there; {IMAGE_PLACEHOLDER} belongs in the messages, once per image.")
    out_ids: list[int] = []
    out_labels: list[int] = []
    kept = 0
    start = 0
    for at in spans + [len(ids)]:
        out_ids += ids[start:at]
        out_labels += labels[start:at]
        if at == len(ids):
            break
        if len(out_ids) + tokens_per_image > max_length:
            break  # this image does not fit whole: the row ends before it
        out_ids += [image_token_id] * tokens_per_image
        out_labels += [IGNORE_INDEX] * tokens_per_image
        kept += 1
        start = at + 1
    return finish_row(out_ids, out_labels, max_length, full_length, images=list(images[:kept]))
