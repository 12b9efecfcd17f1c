"""Images in a record: the one place that finds them, for multimodal training (LLaVA-style).

    split_images(record, fmt="auto", where="record")
    -> {"messages": [Message, ...], "images": [reference, ...], "tools"?: [...]}

The messages are canonical (`tunelab.data.formats.normalise`) with one ``<image>`` placeholder where each image goes,
in the order of ``images``. A reference is what the record gives: a path or URL string (or, from parquet, the
image's own data). Shapes read:

* LLaVA JSON: ``{"image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``;
* LLaMA-Factory (mllm_demo): ``{"messages": [...], "images": ["a.jpg", ...]}`` with ``<image>`` in the text;
* content parts: OpenAI ``{"type": "image_url", "image_url": {"url": ...}}``, LLaMA-Factory v1
  ``{"type": "image_url", "value": ...}``, Hugging Face ``{"type": "image"}`` (the picture in ``images``).

A text-only run refuses all of these (`tunelab.data.formats.normalise` with no image list): the text would be
trained and the pictures it talks about dropped.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.formats import detect_format, normalise
from tunelab.data.messages import IMAGE_PLACEHOLDER, fail


def split_images(record: Any, fmt: str = "auto", where: str = "record") -> dict:
    """The record's messages with <image> placeholders, and its image references in placeholder order."""
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
                       if isinstance(record, dict) else record, fmt, where, images=inline)
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
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in sample["messages"])
    if placeholders != len(images):
        raise fail(where, f"{placeholders} <image> placeholders in the text but {len(images)} images",
                   "Put one <image> in the text where each image goes (LLaVA: '<image>\\n' before the first "
                   "question).")
    return {**sample, "images": images}
