"""LLaVA: a text chat model that sees images, assembled from ordinary HF folders with no remote code.

    image --(the vision model's own processor)--> pixel_values
      --> vision tower (CLIP / SigLIP) --> hidden states of `vision_feature_layer` (CLS dropped with "default")
      --> projector (LLaVA-1.5's 2-layer MLP) --> one embedding per image token
    the language model's input embeddings, image features scattered in at the <image> positions --> language model

The model *is* transformers' `LlavaForConditionalGeneration`, its parts taken from the folders: the language model as
`tunelab.model.load.load_causal_lm` loads it (InternLM2 converted to a native graph, QLoRA's 4-bit weights), the
vision tower with `from_pretrained` (a vision-only folder, or the vision half of a whole CLIP / SigLIP folder such
as openai/clip-vit-large-patch14-336), the projector new or trained. So an export is `save_pretrained` plus a
`LlavaProcessor`, which transformers loads as is, and gives the logits training saw. Training runs the same modules
differently: `image_embeddings` turns a batch into input embeddings and the language model runs on them through
tunelab's text fast path (varlen attention over packed rows, the chunked loss); the frozen tower runs under no_grad.

One `<image>` in the text becomes `image_seq_length` copies of the image token (576 for CLIP-L/336 without its CLS
token), as `LlavaProcessor` expands it: position ids, packing, attention and max_length all see the real length.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.data.multimodal import (IMAGE_TOKEN, VISION_TYPES, add_image_token, image_seq_length,  # noqa: F401
                                     vision_config, vision_family)
from tunelab.errors import TunelabError
from tunelab.model.loss import CausalLMObjective, causal_lm_loss
from tunelab.model.parts import base_model

SELECT_STRATEGIES = ("default", "full")
# settings of the vision model's processor that LlavaImageProcessor takes over as they are
_PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                   "do_normalize", "image_mean", "image_std", "do_convert_rgb")


# --- the vision tower and its processor ------------------------------------------------------------------------

def check_select_strategy(family: str, strategy: str) -> None:
    if strategy not in SELECT_STRATEGIES:
        raise TunelabError(f"vision_feature_select_strategy = {strategy!r}: use 'default' (drop the CLS token, "
                           "LLaVA-1.5) or 'full' (keep every token).")
    if family == "siglip" and strategy == "default":
        raise TunelabError("vision_feature_select_strategy = 'default' drops the CLS token, but a SigLIP tower has "
                           "none (it would drop an image patch): set vision_feature_select_strategy = 'full'.")


def load_vision_tower(path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
                      key: str = "visual_encoder_name_or_path"):
    """The vision model (CLIPVisionModel / SiglipVisionModel) of a folder, on `device` in `dtype`."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    family = vision_family(path, key)
    cls = CLIPVisionModel if family == "clip" else SiglipVisionModel
    return cls.from_pretrained(str(path), dtype=dtype).to(device)


def load_image_processor(path: str | Path, *, pad_to_square: bool = True):
    """The vision model's own processor settings (preprocessor_config.json: resize, crop, mean / std) as a
    LlavaImageProcessor, which also pads each image to a square of the mean colour first when `pad_to_square`
    (LLaVA-1.5), so nothing is cropped away. Training and the exported processor both use it, so they prepare an
    image the same way."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    from tunelab.model.model_dir import resolve_model_dir

    # the configs name the tower by hub id: its downloaded snapshot holds the file. The family first, so a folder
    # that is not a vision model is named as what it is, not as one missing a file
    folder = resolve_model_dir(path, key="visual_encoder_name_or_path")
    family = vision_family(folder)
    config_path = folder / "preprocessor_config.json"
    if not config_path.is_file():
        raise TunelabError(f"{path}: no preprocessor_config.json, so how the vision model expects its images is "
                           "unknown. Copy the vision model's preprocessor_config.json into the folder.")
    try:
        own = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TunelabError(f"{config_path}: not valid JSON ({exc}). Download the vision model's "
                           "preprocessor_config.json again.") from None
    # the vision model's processor class fills in what the file leaves to its defaults (the PIL versions: they need
    # no torchvision, and their settings are the same)
    cls = CLIPImageProcessorPil if family == "clip" else SiglipImageProcessorPil
    full = cls(**{k: v for k, v in own.items() if k in _PROCESSOR_KEYS}).to_dict()
    settings = {k: v for k, v in full.items() if k in _PROCESSOR_KEYS and v is not None}
    settings["do_center_crop"] = bool(full.get("do_center_crop"))  # SigLIP resizes to the square, crops nothing
    return llava_image_processor(**settings, do_pad=pad_to_square)


def llava_image_processor(**settings):
    """transformers' LlavaImageProcessor (its PIL version where torchvision is not installed)."""
    try:
        import torchvision  # noqa: F401
        from transformers import LlavaImageProcessor as cls
    except ImportError:
        from transformers import LlavaImageProcessorPil as cls
    return cls(**settings)


# --- assembly --------------------------------------------------------------------------------------------------

def llava_config(text_config, vision_config, *, image_token_id: int, feature_layer: int | list[int] = -2,
                 select_strategy: str = "default", projector_hidden_act: str = "gelu"):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                       image_seq_length=image_seq_length(vision_config, select_strategy),
                       vision_feature_layer=feature_layer, vision_feature_select_strategy=select_strategy,
                       projector_hidden_act=projector_hidden_act,
                       tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))


def assemble(llm, vision_tower, *, image_token_id: int, feature_layer: int | list[int] = -2,
             select_strategy: str = "default", projector_hidden_act: str = "gelu", projector_dtype=None):
    """A LlavaForConditionalGeneration made of `llm` (a causal LM whose vocabulary holds `image_token_id`) and
    `vision_tower`, with a new projector (PyTorch's default init, as LLaVA's). The modules are used, not copied:
    a 4-bit `llm` stays 4-bit."""
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    check_select_strategy(VISION_TYPES.get(vision_tower.config.model_type, "clip"), select_strategy)
    text_config = llm.config
    if image_token_id >= llm.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"image token id {image_token_id} is outside the language model's vocabulary; "
                         "resize its embeddings first (add_image_token + resize_token_embeddings)")
    config = llava_config(text_config, vision_tower.config, image_token_id=image_token_id,
                          feature_layer=feature_layer, select_strategy=select_strategy,
                          projector_hidden_act=projector_hidden_act)
    with torch.device("meta"):  # the shell only: every part is replaced below
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_tower
    model.model.language_model = getattr(llm, llm.base_model_prefix)
    model.lm_head = llm.get_output_embeddings()
    embed = llm.get_input_embeddings().weight
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(
        device=embed.device, dtype=projector_dtype or (embed.dtype if embed.is_floating_point() else torch.float32))
    model.config.text_config = text_config
    model.config.vision_config = vision_tower.config
    model.config.use_cache = False
    if getattr(llm, "generation_config", None) is not None:
        model.generation_config = llm.generation_config
    return model


def resize_for_image_token(llm, image_token_id: int) -> None:
    """Grow the language model's vocabulary to hold the image token if it does not yet. The new rows of the input
    and output embeddings are the mean of the others: the same every time the model is assembled (so an adapter's
    base is rebuilt exactly at export), and the input row is never used (image positions get image features)."""
    old = llm.get_input_embeddings().weight.shape[0]
    if image_token_id < old:
        return
    llm.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
    with torch.no_grad():
        for module in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None
                       }.values():
            weight = module.weight
            weight[old:] = weight[:old].float().mean(0).to(weight.dtype)


# --- the parts, through a peft wrapper ---------------------------------------------------------------------------

def llava_model(model):
    """The LlavaForConditionalGeneration inside a peft wrapper (or the model itself)."""
    return base_model(model)


def is_llava(model) -> bool:
    return getattr(getattr(llava_model(model), "config", None), "model_type", None) == "llava"


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[images, image tokens, hidden]: the projected features of each image, as LlavaModel.get_image_features
    computes them. A frozen tower runs under no_grad (its activations are not kept for backward)."""
    llava = llava_model(model)
    tower, projector, config = llava.model.vision_tower, llava.model.multi_modal_projector, llava.config
    tower_trained = any(p.requires_grad for p in tower.parameters())
    first = next(tower.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trained):
        out = tower(pixel_values.to(first.device, first.dtype if first.is_floating_point() else pixel_values.dtype),
                    output_hidden_states=True)
        layers = config.vision_feature_layer
        chosen = [out.hidden_states[i] for i in (layers if isinstance(layers, (list, tuple)) else [layers])]
        if config.vision_feature_select_strategy == "default":
            chosen = [h[:, 1:] for h in chosen]
        selected = torch.cat(chosen, dim=-1)
    weight = projector.linear_1.weight
    return projector(selected.to(weight.dtype))


def image_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """The language model's input embeddings for `input_ids`, the images' features at the image-token positions
    (in order: row by row, left to right, as `pixel_values` lists the images)."""
    llava = llava_model(model)
    embeds = llava.get_input_embeddings()(input_ids)
    if pixel_values is None or pixel_values.shape[0] == 0:
        # a batch of text only still runs the projector (on nothing), so every engine sees it take part in the
        # step: DDP's gradient all-reduce waits for each trained parameter
        projector = llava.model.multi_modal_projector
        nothing = projector.linear_1.weight.new_zeros((0, projector.linear_1.in_features))
        return embeds + projector(nothing).sum().to(embeds.dtype)
    features = image_features(model, pixel_values)
    # (the rows hold exactly these images' tokens, by construction: tunelab.data.multimodal.expand_image_tokens;
    # counting them here would make every step wait for the GPU)
    mask = input_ids == llava.config.image_token_id
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


class LlavaObjective(CausalLMObjective):
    """The loss a LLaVA run minimises: the input embeddings with the images' features in place, then the text loss
    on the language model (`tunelab.model.loss.causal_lm_loss`, chunked over trained tokens). Called like every
    objective: objective(model, batch) -> (loss_sum, n_trained_tokens)."""

    def __call__(self, model, batch: dict):
        embeds = image_embeddings(model, batch["input_ids"], batch.get("pixel_values"))
        return causal_lm_loss(model, {**batch, "inputs_embeds": embeds}, **self.options)


def llava_objective(plan) -> LlavaObjective:
    """LlavaObjective as `plan` (a `tunelab.model.plan.FastPathPlan`) runs it."""
    return LlavaObjective(chunk_size=plan.loss_chunk_size, chunked=plan.chunked_loss, compiled=plan.compiled_loss)


# --- export --------------------------------------------------------------------------------------------------------

def processor_for(model, tokenizer, image_processor, chat_template: str | None = None):
    """The LlavaProcessor that prepares inputs as training did: the same image processor, one <image> expanded to
    the image's tokens, the training chat template (which also reads OpenAI-style content lists)."""
    from transformers import LlavaProcessor

    config = llava_model(model).config
    has_cls = config.vision_config.model_type.startswith("clip")
    template = with_content_lists(chat_template) if chat_template else None
    if template:
        tokenizer.chat_template = template
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1 if has_cls else 0, chat_template=template,
                          image_token=IMAGE_TOKEN)


def with_content_lists(chat_template: str) -> str:
    """A chat template that also takes messages whose content is a list of parts ({"type": "image"},
    {"type": "text", "text": ...}), as HF processors pass them: each list becomes text with <image> where each
    image goes, joined as tunelab's data reader joins OpenAI content parts."""
    prelude = (
        "{%- set _tl = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string or m['content'] is none -%}{%- set _tl.messages = _tl.messages + [m] -%}"
        "{%- else -%}{%- set _part = namespace(text='') -%}"
        "{%- for p in m['content'] -%}"
        "{%- if p['type'] in ('image', 'image_url', 'input_image') -%}{%- set _part.text = _part.text + '"
        + IMAGE_TOKEN + "' -%}"
        "{%- elif p['type'] == 'text' -%}{%- set _part.text = _part.text + p['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _tl.messages = _tl.messages + [dict(m, content=_part.text)] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _tl.messages -%}"
    )
    return prelude + chat_template


def save_hf_llava(model, tokenizer, image_processor, out_dir: str | Path, *, chat_template: str | None = None,
                  dtype: torch.dtype | None = None, max_shard_size: str = "2GB") -> Path:
    """Write `model` (LoRA merged in, if any) as a HF LLaVA folder: LlavaForConditionalGeneration's weights and
    config, and a LlavaProcessor (tokenizer, image processor, chat template) that transformers loads as is."""
    out = Path(out_dir)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(dtype)
    model.config.use_cache = True
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor_for(model, tokenizer, image_processor, chat_template).save_pretrained(out)
    return out


def is_llava_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def load_hf_llava(path: str | Path, *, dtype: torch.dtype | str = "auto", device: torch.device | str = "cpu"):
    """(LlavaForConditionalGeneration, LlavaProcessor) of a HF LLaVA folder (an export, or llava-hf/...)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype).to(device)
    return model, AutoProcessor.from_pretrained(str(path))
