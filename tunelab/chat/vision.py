"""A chat message's content parts in chat, web and serve: text, reasoning and tool-call parts for every model (a text
model refuses pictures), and for a LLaVA model (a HF LLaVA folder, or a LLaVA run's checkpoint) its images.

Messages may carry images as OpenAI content parts (``{"type": "image_url", "image_url": {"url": ...}}``), read by
the same code as training data (`tunelab.data.messages.read_content`): each part becomes ``<image>`` in the text, at
its place, and the picture is prepared by the model's own image processor. The prompt's ids then hold each image's
tokens (as many as the vision tower gives features), and the engine hands the pixel values to the model with them.

Where a picture may come from: a ``data:image/...;base64,...`` URL always; a file path only from the terminal
(`tunelab chat --image`), never from a request to the server (a client must not read the server's files); web
addresses never (nothing is downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.data import messages as msg
from tunelab.data.files import InvalidRecord
from tunelab.data.images import (DATA_URL, describe, fit_for_padding, open_image, resolve_image,
                                 why_unreadable)
from tunelab.errors import TunelabError

CHAT_FIXES = {
    "media": "A chat reads text, and images with a LLaVA model: leave out video, audio and file parts.",
    "type": "Content parts are 'text' or 'image_url' (an assistant's also 'reasoning' or 'tool_call'): fix the type.",
}
"""The advice of `read_content`'s errors in a chat (a request, the terminal): there is no data file to fix."""


@dataclass
class Vision:
    """What a LLaVA model needs from a prompt besides its text."""

    processor: object
    """The image processor the model was trained with."""
    token_id: int
    per_image: int
    """Image tokens one image becomes."""

    def expand(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            out += [t] * self.per_image if t == self.token_id else [t]
        return out

    def pixel_values(self, refs: list[str], places: list[str] | None = None):
        """The pictures prepared by the image processor; `places` name them in a message (messages[0].content[1])."""
        if not refs:
            return None
        images = []
        for k, ref in enumerate(refs):
            try:
                images.append(open_image(ref))
            except OSError as exc:
                where = places[k] if places and k < len(places) else f"image {k + 1}"
                if not ref.startswith(DATA_URL):
                    where += f" ({describe(ref)})"
                raise TunelabError(f"request: {where}: the image cannot be read ({why_unreadable(exc)}): send a "
                                   f"PNG, JPEG, WebP or GIF picture.") from None
        return self.processor(images=fit_for_padding(images, self.processor), return_tensors="pt")["pixel_values"]


def split_images(messages: list[dict], *, files: bool, places: list | None = None) -> tuple[list[dict], list[str]]:
    """(messages with text content and <image> where each picture goes, the pictures in order). Reasoning and tool-call
    parts of an assistant message become its reasoning_content and tool_calls, as in training data. `files`: whether a
    part may name a file on this machine (the terminal), else only data URLs (a request to the server). `places`: a
    list to collect where each picture is (messages[0].content[1]) into."""
    out, refs = [], []
    for i, m in enumerate(messages):
        found: list = []
        try:
            read = msg.read_content(m.get("content"), role=m.get("role", "user"), where="request",
                                    field=f"messages[{i}].content", images=found, fixes=CHAT_FIXES)
            if places is not None:
                parts = m["content"] if isinstance(m.get("content"), list) else [m.get("content")]
                places += [f"messages[{i}].content[{j}]" for j, part in enumerate(parts)
                           if isinstance(part, dict) and part.get("type") in msg.IMAGE_PARTS]
            for ref in found:
                if not files and not (isinstance(ref, str) and ref.startswith(DATA_URL)):
                    raise InvalidRecord(f"request: messages[{i}] has an image that is not a data URL: send the "
                                        "picture itself, as 'data:image/png;base64,...' (the server reads no files "
                                        "and downloads nothing).")
                refs.append(resolve_image(ref, base_dir=Path.cwd(), image_folder=None, where="request",
                                          at=f"messages[{i}] image"))
        except InvalidRecord as exc:
            raise TunelabError(str(exc)) from None
        entry = {**m, **read}
        if read.get("tool_calls") and m.get("tool_calls"):  # calls as parts and as the message's own field
            entry["tool_calls"] = [*m["tool_calls"], *read["tool_calls"]]
        if read.get("reasoning_content") and m.get("reasoning_content"):  # the same of reasoning
            entry["reasoning_content"] = m["reasoning_content"] + read["reasoning_content"]
        out.append(entry)
    return out, refs


def with_images(question: str, images: list[str]) -> list[dict]:
    """A terminal question with `--image` files attached: OpenAI content parts, pictures first (LLaVA's habit)."""
    return [{"type": "image_url", "image_url": {"url": path}} for path in images] + [{"type": "text", "text": question}]


_LLAVA_ONLY = "Chat with a LLaVA model (trained from a llava config, docs/MULTIMODAL.md) to ask about images."


def text_only(messages: list[dict]) -> None:
    """A TunelabError when a model that reads no images is sent some (never dropped silently)."""
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in msg.IMAGE_PARTS
                                             for p in content):
            raise TunelabError(f"messages[{i}] has an image, but this model reads text only. {_LLAVA_ONLY}")



def reads_images(base: str, meta: dict) -> bool:
    """Whether the model `load_chat_model` loads from `base` (its tunelab.json: `meta`) is a LLaVA one, which reads
    images: told by tunelab.json and config.json alone, without the weights."""
    from tunelab.model.llava import is_llava_dir

    return bool(meta.get("llava")) or is_llava_dir(base)


def check_chat_images(paths: list[str], model_path: str, adapter: str | None):
    """`tunelab chat --image`, before minutes of loading: the model reads images, and each file is a picture.
    A TunelabError naming the first that fails. Returns what `model_to_load` made of MODEL and --adapter (a
    checkpoint's checksums checked), for `load_chat_model` to load without checking it again."""
    from tunelab.export.adapters import model_to_load

    to_load = model_to_load(model_path, adapter)
    if not reads_images(to_load.base, to_load.meta):
        raise TunelabError(f"--image: {adapter or model_path} reads text only. {_LLAVA_ONLY}")
    for path in paths:
        file = Path(path.removeprefix("file://")).expanduser()
        if not path.startswith((DATA_URL, "http://", "https://")) and not file.is_file():
            raise TunelabError(f"--image {path}: " + ("a folder, not a picture." if file.is_dir() else
                                                     "no such file. Check the path."))
        try:  # the chat reads it with resolve_image: a data URL or a file:// path too, never a web address
            ref = resolve_image(path, base_dir=Path.cwd(), image_folder=None, where="--image", at="the picture")
            open_image(ref, draft=(64, 64))  # a JPEG decoded small: enough to know it is one
        except InvalidRecord as exc:
            raise TunelabError(str(exc)) from None
        except OSError as exc:
            raise TunelabError(f"--image {path}: the image cannot be read ({why_unreadable(exc)}): give a PNG, JPEG, "
                               "WebP or GIF picture.") from None
    return to_load


def load_llava_chat(base: str, meta: dict | None, model_dir: Path | None, *, device, dtype, bits=None):
    """(model, tokenizer, Vision) of a HF LLaVA folder (`base`), or of a LLaVA run's checkpoint (`model_dir`, its
    tunelab.json naming the language model and vision tower; LoRA merged in)."""
    import torch

    from tunelab.data.multimodal import image_seq_length
    from tunelab.model import llava
    from tunelab.model.load import resolve_dtype
    from tunelab.model.tokenizer import load_tokenizer

    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if bits:
        raise TunelabError("--bits: a LLaVA model loads unquantised here; leave --bits out.")
    if model_dir is not None:
        from tunelab.model.llava_train import rebuild_for_export

        settings = meta["llava"]
        model = rebuild_for_export(meta, model_dir, dtype=torch_dtype, device=dev)
        tokenizer = load_tokenizer(meta["base_model"])
        llava.add_image_token(tokenizer)
        processor = llava.load_image_processor(settings["visual_encoder"], pad_to_square=settings["image_pad_to_square"])
    else:
        model, hf_processor = llava.load_hf_llava(base, dtype=torch_dtype, device=dev)
        tokenizer, processor = hf_processor.tokenizer, hf_processor.image_processor
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    config = model.config
    vision = Vision(processor, config.image_token_id,
                    image_seq_length(config.vision_config, config.vision_feature_select_strategy))
    return model, tokenizer, vision
