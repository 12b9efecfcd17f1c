"""What a LLaVA run adds to the training loop (docs/MULTIMODAL.md), decided once before training starts.

* the images of each batch: loaded by the vision model's own processor (`collate(..., images=...)`);
* the pictures the evaluation questions are asked about (`evaluation_images`), checked to open before step 1;
* `pretrained_pth` as a checkpoint: stage 1's work dir means its last checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunelab.data.images import ImageLoader, describe, open_image
from tunelab.data.multimodal import ImageTokens, image_tokens
from tunelab.errors import TunelabError
from tunelab.train import layout


@dataclass
class VisionRun:
    images: ImageLoader
    """A batch's image references -> pixel values."""
    tokens: ImageTokens
    evaluation_images: list[Optional[str]]
    """The picture of each evaluation question (None: the question alone)."""


def vision_run(cfg, tokenizer, config_dir: str | None) -> Optional[VisionRun]:
    """The LLaVA parts of a run (None for a text-only run); adds <image> to `tokenizer`."""
    if not cfg.visual_encoder_name_or_path:
        return None
    from tunelab.model.llava import load_image_processor

    processor = load_image_processor(cfg.visual_encoder_name_or_path, pad_to_square=cfg.image_pad_to_square)
    pictures = cfg.evaluation_images
    pictures = [] if pictures is None else [pictures] if isinstance(pictures, str) else list(pictures)
    if len(pictures) == 1:
        pictures = pictures * len(cfg.evaluation_inputs)
    resolved = [_find(p, config_dir) for p in pictures] or [None] * len(cfg.evaluation_inputs)
    return VisionRun(ImageLoader(processor), image_tokens(cfg, tokenizer), resolved)


def _find(path: str, config_dir: str | None) -> str:
    candidates = ([Path(config_dir) / path] if config_dir and not Path(path).is_absolute() else []) + [Path(path)]
    for candidate in candidates:
        if candidate.is_file():
            try:
                open_image(str(candidate), draft=(64, 64))
            except OSError as exc:
                raise TunelabError(f"evaluation_images: {candidate} cannot be read ({exc}).") from None
            return str(candidate.resolve())
    raise TunelabError(f"evaluation_images: {describe(path)} not found (looked at "
                       f"{' and '.join(map(str, candidates))}). Relative paths are read from the config file's folder, "
                       "then the current directory.")


def with_pretrained_checkpoint(cfg, config_dir: str | None):
    """`cfg` with `pretrained_pth` naming a checkpoint or weights folder: a work dir becomes its last checkpoint."""
    if not cfg.pretrained_pth:
        return cfg
    path = Path(cfg.pretrained_pth).expanduser()
    candidates = ([Path(config_dir) / path] if config_dir and not path.is_absolute() else []) + [path]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise TunelabError(f"pretrained_pth = {cfg.pretrained_pth!r}: not found (looked at "
                           f"{' and '.join(map(str, candidates))}). Train stage 1 first (its *_pretrain config), or "
                           "point pretrained_pth at its work dir or checkpoint.")
    last = None if layout.is_checkpoint(found) else layout.last_checkpoint(found)
    return dataclasses.replace(cfg, pretrained_pth=str((last or found).resolve()))
