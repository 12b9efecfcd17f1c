"""Images of multimodal samples: where each one is, whether it opens, and a batch of them as pixel values.

A record names its images (`tunelab.data.multimodal.split_images`); each reference is resolved once, when the data
is read, into a string kept with the rows (never the pixels: images are loaded per batch, `ImageLoader`):

* a file path: an absolute path as it is; a relative one from `image_folder` when set (LLaVA's convention:
  ``"image": "coco/train2017/1.jpg"`` with ``image_folder = "data/llava_images"``), else from the data file's folder;
* a ``data:image/...;base64,...`` URL (OpenAI image_url parts), kept as it is;
* the image's own bytes (a parquet / `datasets` Image column: ``{"bytes": ..., "path": ...}``), kept as a data URL.

Web addresses are refused: download the images and point at the files. A missing file is an `InvalidRecord` naming
the record when it is read; `check_images` then opens every image once (in threads, a reduced JPEG draft), so a
broken file stops the run before training, naming the record, or is skipped and counted with `skip_invalid`.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tunelab.data.data_path import RELATIVE_PATHS, find_config_path
from tunelab.data.files import InvalidRecord
from tunelab.data.multimodal import split_images
from tunelab.errors import TunelabError


def is_image_file(path: Path) -> bool:
    """A file PIL opens by its suffix (a picture a multimodal record may name)."""
    from PIL import Image

    return path.suffix.lower() in Image.registered_extensions()


DATA_URL = "data:"


def resolve_image(ref: Any, *, base_dir: Optional[Path], image_folder: Optional[Path], where: str,
                  at: str = "image", setting: str = "image_folder") -> str:
    """A record's image reference as the string stored with the rows (see the module docstring). `setting`: what
    sets image_folder, for the message of a missing file (the config's image_folder, a command's --image-folder)."""
    if isinstance(ref, dict):  # a `datasets` Image value: its bytes, or a path
        if ref.get("bytes"):
            ref = ref["bytes"]
        elif ref.get("path"):
            ref = ref["path"]
        else:
            raise InvalidRecord(f"{where}: {at} is {ref!r}, which names no picture. Give a file path, a data URL "
                                "or the image's bytes.")
    if isinstance(ref, (bytes, bytearray)):
        return DATA_URL + "image;base64," + base64.b64encode(bytes(ref)).decode()
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidRecord(f"{where}: {at} should be a file path or a data URL, found {type(ref).__name__} "
                            f"{str(ref)[:40]!r}.")
    ref = ref.strip()
    if ref.startswith(DATA_URL):
        if ";base64," not in ref[:100]:
            raise InvalidRecord(f"{where}: {at} is a data URL without ';base64,'. Write it as "
                                "'data:image/png;base64,<the bytes in base64>'.")
        return ref
    if ref.startswith(("http://", "https://")):
        raise InvalidRecord(f"{where}: {at} is a web address ({ref[:80]}). tunelab reads images from files: "
                            "download them and give the file paths (relative to image_folder or the data file).")
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = (image_folder or base_dir or Path.cwd()) / path
    if path.is_dir():
        raise InvalidRecord(f"{where}: {at} {ref!r} is a folder ({path}), not an image file. Name the picture in it.")
    if not path.is_file():
        hint = (f"set {setting} to the folder the image paths start from" if image_folder is None else
                f"image paths are read from {setting}{' ' if setting.startswith('-') else ' = '}{str(image_folder)!r}")
        raise InvalidRecord(f"{where}: {at} {ref!r}: no such file ({path}). Check the path; {hint}.")
    return str(path)


def _bytes_of(ref: str) -> bytes | str:
    if ref.startswith(DATA_URL):
        try:
            return base64.b64decode(ref.split(";base64,", 1)[1], validate=False)
        except (binascii.Error, ValueError) as exc:
            raise OSError(f"the data URL is not valid base64 ({exc})") from None
    return ref


def describe(ref: str) -> str:
    """A reference short enough for a message."""
    return ref if not ref.startswith(DATA_URL) else ref[:40] + "..."


MAX_ASPECT = 200
"""An image with one side longer than this many times the other is refused: a vision model sees nothing in so
narrow a strip, and its processor would scale the strip up to a huge image first (a 1x20000 PNG of 160 bytes)."""
PADDED_MAX_SIDE = 4096
"""Padding to a square (LLaVA-1.5) works on a square of the longest side: a longer image is scaled down to this first
(a 1080x20000 screenshot would pad to 400 million pixels; a 4096 square still dwarfs the tower's 336 or 384)."""


def open_image(ref: str, *, draft: Optional[tuple[int, int]] = None):
    """The image as an RGB PIL image (OSError when it cannot be read, or is a strip too narrow to see: MAX_ASPECT).
    `draft`: decode a JPEG at a reduced size (enough to check a file, much faster)."""
    from PIL import Image

    source = _bytes_of(ref)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if draft:
            image.draft("RGB", draft)
        image.load()
    except OSError:
        raise
    except Exception as exc:  # PIL raises ValueError / SyntaxError etc. for some damaged files
        raise OSError(f"{type(exc).__name__}: {exc}") from None
    width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise OSError(f"it is {width}x{height} pixels, one side over {MAX_ASPECT} times the other: too narrow a "
                      f"strip for a vision model; crop it or cut it into pictures")
    return _eight_bit(image).convert("RGB")


def _eight_bit(image):
    """16-bit and 32-bit greyscale (PNG / TIFF scans) scaled to 8 bits: converting them to RGB directly clips every
    value above 255, which turns the picture white."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return image
    image = image.convert("F")
    low, high = image.getextrema()
    if high <= 255 and low >= 0:  # 8-bit values in a wider mode: nothing to scale
        return image.convert("L")
    scale = 255 / (65535 if high <= 65535 and low >= 0 else max(abs(low), abs(high)) or 1)
    return image.point(lambda v: v * scale).convert("L")


def fit_for_padding(images: list, processor) -> list:
    """`images` scaled down to PADDED_MAX_SIDE where the processor pads each to a square first (the output size is the
    tower's either way). Resizing the shortest side to the tower's instead (CLIP without padding) grows the other side
    by as much: MAX_ASPECT bounds that."""
    if not getattr(processor, "do_pad", False):
        return images
    for image in images:
        if max(image.size) > PADDED_MAX_SIDE:
            image.thumbnail((PADDED_MAX_SIDE, PADDED_MAX_SIDE))  # in place, aspect kept; open_image's own copy
    return images


def why_unreadable(error: OSError) -> str:
    """Pillow's reason without the object it read from ("cannot identify image file <_io.BytesIO object at 0x...>")."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not a picture in a format it knows"
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error)) or type(error).__name__


def check_images(refs: list[str], threads: int = 8) -> dict[str, str]:
    """Open each image once; returns {reference: why it cannot be read} for those that fail."""
    unique = list(dict.fromkeys(refs))

    def check(ref: str) -> Optional[str]:
        try:
            open_image(ref, draft=(64, 64))
        except OSError as exc:
            return why_unreadable(exc)
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes with the GIL released
        problems = list(pool.map(check, unique))
    return {ref: why for ref, why in zip(unique, problems) if why}


def read_images(record, fmt: str, where: str, reading: "ImageReading", base_dir: Optional[Path], *,
                reply_needed: bool = True) -> dict:
    """A multimodal record's sample (`tunelab.data.multimodal.split_images`) with its images resolved, and
    "where" (the record's place, for later messages). `reply_needed`: False reads a conversation that ends before its
    reply too (`tunelab predict`'s prompts)."""
    sample = split_images(record, fmt, where, reply_needed=reply_needed)
    sample["images"] = [resolve_image(ref, base_dir=base_dir, image_folder=reading.image_folder, where=where,
                                      at=f"image {i + 1}", setting=reading.setting)
                        for i, ref in enumerate(sample["images"])]
    sample["where"] = where
    return sample


SKIP_FIX = "Replace the file, or set skip_invalid = True to skip such records (they are counted)."
"""What training's message about an image that cannot be read advises."""


def unreadable_samples(samples: list[dict], fix: str = SKIP_FIX) -> dict[int, str]:
    """{index: message naming the record and the image, then `fix`} of the samples with an image that cannot be
    read (each image opened once, in threads)."""
    import os

    broken = check_images([ref for sample in samples for ref in sample.get("images", ())],
                          threads=2 * (os.cpu_count() or 1))
    out = {}
    for i, sample in enumerate(samples):
        bad = next((ref for ref in sample.get("images", ()) if ref in broken), None)
        if bad is not None:
            where = sample.get("where", f"sample {i}")
            out[i] = f"{where}: image {describe(bad)} cannot be read ({broken[bad]}). {fix}"
    return out


class ImageLoader:
    """A batch's image references -> pixel_values [images, 3, H, W] (float32), prepared by `processor` (the vision
    model's own processor, `tunelab.model.llava.load_image_processor`), decoded in threads."""

    def __init__(self, processor, threads: int = 4):
        self.processor = processor
        self.pool = ThreadPoolExecutor(max(1, threads))

    def load(self, ref: str):
        try:
            return open_image(ref)
        except OSError as exc:
            raise TunelabError(f"image {describe(ref)}: cannot be read ({exc}). It opened when the data was "
                               "prepared: was it changed or removed since? Restore it, or delete the data cache "
                               "(TUNELAB_CACHE) so the data is checked again.") from None

    def __call__(self, refs: list[str]):
        import torch

        if not refs:
            return torch.zeros(0)
        images = fit_for_padding(list(self.pool.map(self.load, refs)), self.processor)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.float()


@dataclass(frozen=True)
class ImageReading:
    """How a multimodal run reads the images of its records (None in a text-only run)."""

    image_folder: Optional[Path] = None
    """Where relative image paths start; None: the data file's folder."""
    setting: str = "image_folder"
    """What sets image_folder, for messages (`tunelab predict`'s --image-folder)."""


def image_reading(cfg, config_dir: str | None = None) -> Optional[ImageReading]:
    """The run's ImageReading, or None when `cfg` trains a text-only model (no vision tower)."""
    if not getattr(cfg, "visual_encoder_name_or_path", None):
        return None
    folder = getattr(cfg, "image_folder", None)
    if not folder:
        return ImageReading()
    found, looked = find_config_path(folder, config_dir, Path.is_dir)
    there, _ = find_config_path(folder, config_dir)
    if found is None and there is not None:
        raise TunelabError(f"image_folder = {folder!r}: {there} is a file, not a folder. Set image_folder to the "
                           "folder the records' image paths start from.")
    if found is None:
        raise TunelabError(f"image_folder = {folder!r}: no such folder (looked at {looked}). {RELATIVE_PATHS}")
    return ImageReading(found.resolve())
