"""What a LLaVA run adds to the training loop (docs/MULTIMODAL.md), decided once before training starts.

* the images of each batch: loaded by the vision model's own processor (`collate(..., images=...)`);
* the pictures the evaluation questions are asked about (`evaluation_images`), checked to open before step 1;
* `pretrained_pth` as a checkpoint: stage 1's work dir means its newest checkpoint;
* a stage 2 without it: a note that its projector starts new.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunelab.data.data_path import RELATIVE_PATHS, find_config_path
from tunelab.data.images import ImageLoader, describe, open_image
from tunelab.data.messages import IMAGE_PLACEHOLDER
from tunelab.data.multimodal import ImageTokens, image_tokens
from tunelab.errors import TunelabError
from tunelab.train import layout

log = logging.getLogger(__name__)


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
    _check_feature_layer(cfg.vision_feature_layer, cfg.visual_encoder_name_or_path)
    pictures = cfg.evaluation_images
    pictures = [] if pictures is None else [pictures] if isinstance(pictures, str) else list(pictures)
    if len(pictures) == 1:
        pictures = pictures * len(cfg.evaluation_inputs)
    resolved = [_find(p, config_dir) for p in pictures] or [None] * len(cfg.evaluation_inputs)
    _check_placeholders(cfg.evaluation_inputs, resolved)
    return VisionRun(ImageLoader(processor), image_tokens(cfg, tokenizer), resolved)


def _check_feature_layer(layer: int, tower: str) -> None:
    """The tower's hidden states are its embeddings and one output per layer: a layer past them is an IndexError in
    transformers at the first step, and -(layers + 1) the embeddings (which the schema refuses as 0)."""
    from tunelab.data.multimodal import vision_config

    layers = vision_config(tower).num_hidden_layers
    if not (1 <= layer <= layers or -layers <= layer <= -1):
        raise TunelabError(f"vision_feature_layer = {layer}: the vision tower {tower} has {layers} layers: use 1 to "
                           f"{layers}, or -1 to -{layers} counting from the last (LLaVA-1.5: -2, the second to last).")


def _check_placeholders(questions: list[str], pictures: list[Optional[str]]) -> None:
    """A question may write where its picture goes (<image>, as records do), once; without a picture the image token
    would reach the model with no image features behind it (transformers stops, or the answer is about nothing)."""
    for i, (question, picture) in enumerate(zip(questions, pictures)):
        count = question.count(IMAGE_PLACEHOLDER)
        if count and not picture:
            raise TunelabError(f"evaluation_inputs[{i}] writes {IMAGE_PLACEHOLDER} but has no picture: set "
                               f"evaluation_images (one path for every question, or one per question), or remove "
                               f"{IMAGE_PLACEHOLDER} from the question.")
        if count > 1:
            raise TunelabError(f"evaluation_inputs[{i}] writes {IMAGE_PLACEHOLDER} {count} times, and a question is "
                               f"asked about one picture (evaluation_images): keep one {IMAGE_PLACEHOLDER}, or none "
                               f"(the picture then goes before the question).")


def question_content(question: str, picture: Optional[str]) -> str:
    """An evaluation question as the user turn: the picture before it, unless it says where (checked above)."""
    if not picture or IMAGE_PLACEHOLDER in question:
        return question
    return f"{IMAGE_PLACEHOLDER}\n{question}"


def _find(path: str, config_dir: str | None) -> str:
    found, looked = find_config_path(path, config_dir, Path.is_file)
    if found is None:
        there, _ = find_config_path(path, config_dir)
        if there is not None:
            raise TunelabError(f"evaluation_images: {there} is a folder, not a picture. Name the image file.")
        raise TunelabError(f"evaluation_images: {describe(path)} not found (looked at {looked}). {RELATIVE_PATHS}")
    try:
        open_image(str(found), draft=(64, 64))
    except OSError as exc:
        raise TunelabError(f"evaluation_images: {found} cannot be read ({exc}).") from None
    return str(found.resolve())


def with_pretrained_checkpoint(cfg, config_dir: str | None):
    """`cfg` with `pretrained_pth` naming a checkpoint or weights folder: a work dir becomes its newest checkpoint."""
    if not cfg.pretrained_pth:
        return cfg
    found, looked = find_config_path(cfg.pretrained_pth, config_dir)
    if found is None:
        raise TunelabError(f"pretrained_pth = {cfg.pretrained_pth!r}: not found (looked at {looked}). Train stage 1 "
                           "first (its *_pretrain config), or point pretrained_pth at its work dir or checkpoint, or "
                           "set pretrained_pth = None to start from a new projector, trained here with the language "
                           "model (without stage 1's image-caption pretraining).")
    last = None
    if not layout.is_checkpoint(found) and layout.looks_like_work_dir(found):
        last = layout.newest_checkpoint(found)
        if last is None:
            raise TunelabError(f"pretrained_pth = {cfg.pretrained_pth!r}: a work dir without a checkpoint yet "
                               f"({found}: stage 1 stopped, or is still running, before its first save). Let stage "
                               "1 save a checkpoint (save_steps), or point pretrained_pth at one.")
    _check_stage_one(cfg, last or found)
    return dataclasses.replace(cfg, pretrained_pth=str((last or found).resolve()))


def projector_note(cfg, *, resuming: bool) -> Optional[str]:
    """The start-of-training note of a stage 2 (the language model trains) with pretrained_pth = None: its projector
    starts from random weights, without stage 1's image-caption pretraining. That is allowed, so it is no error, but
    a stage 2 config copied without running stage 1 would otherwise start that way without a word. Stage 1's
    projector is new by design; a resumed run's projector is the checkpoint's."""
    if not cfg.visual_encoder_name_or_path or cfg.freeze_llm or cfg.pretrained_pth or resuming:
        return None
    return ("note: pretrained_pth = None: a new projector (random weights) is trained here with the language model, "
            "without stage 1's image-caption pretraining; to start from stage 1's, set pretrained_pth to its work "
            "dir or checkpoint.")


# how stage 1 made its projector's inputs and outputs: another value gives a projector of the same shapes made for
# other features, which would train on from there silently
_PROJECTOR_SETTINGS = ("vision_feature_layer", "projector_hidden_act")


def _check_stage_one(cfg, checkpoint: Path) -> None:
    """Stage 2 starts from stage 1's projector: its tunelab.json (a checkpoint's or an export's) says what for. Read
    before anything loads; the weights' shapes are compared when they load (`llava_train.load_projector`)."""
    meta = layout.read_meta(checkpoint)
    if meta is None:  # weights from elsewhere: only their shapes can be checked
        return
    at = f"pretrained_pth = {cfg.pretrained_pth!r} ({checkpoint})"
    settings = meta.get("llava")
    if not settings:
        raise TunelabError(f"{at} is a checkpoint of a text-only run (its tunelab.json names no vision tower): there "
                           "is no projector in it. Point pretrained_pth at stage 1's work dir or checkpoint (the run "
                           "of a *_pretrain config).")
    for key in _PROJECTOR_SETTINGS:
        if key in settings and settings[key] != getattr(cfg, key):
            raise TunelabError(f"{at}: stage 1 trained its projector with {key} = {settings[key]!r}; this run has "
                               f"{getattr(cfg, key)!r}, so the projector would get other features. Set {key} = "
                               f"{settings[key]!r} as stage 1 had, or train stage 1 again with it.")
    for key, recorded in (("pretrained_model_name_or_path", meta.get("base_model")),
                          ("visual_encoder_name_or_path", settings.get("visual_encoder")),
                          ("vision_feature_select_strategy", settings.get("vision_feature_select_strategy"))):
        current = getattr(cfg, key)
        if recorded is not None and recorded != current and not _same_folder(recorded, current):
            log.warning("%s: stage 1 trained its projector for %s = %r; this run has %r. If that is the same model "
                        "in another place, ignore this; otherwise the projector starts from a mapping made for "
                        "another model.", at, key, recorded, current)


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
