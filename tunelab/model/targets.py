"""LoRA's targets, and the modules partial fine-tuning trains, checked against the model's module names before any
weight is read.

lora_target_modules and lora_modules_to_save name modules. peft passes over a target entry that matches nothing as
long as another entry matches, and over a lora_modules_to_save entry that matches nothing at all, so a typo would
train fewer modules than asked, silently; checked once the weights had loaded, it stopped a 7B run after minutes.
The names come instead from `empty_model`: the model a run trains, built from its config files alone on the meta
device (no memory, no weight file opened), of the same classes `load.load_causal_lm` and
`llava_train.build_for_training` load the weights into, so of the same module names. Quantising (bitsandbytes'
layers are nn.Linear subclasses under the same names), checkpointing and InternLM2's conversion (done on the config
here too) rename nothing, which is why no check is left after loading.
"""

from __future__ import annotations

import re

import torch

from tunelab.errors import TunelabError
from tunelab.model.freeze import partial, trained_modules
from tunelab.model.model_dir import build_config, check_architecture, new_model, read_model_config, resolve_model_dir
from tunelab.model.plan import names_module


def check_targets_before_loading(cfg) -> None:
    """The LoRA settings of `cfg` name modules of its model (`check_lora_targets`; a LLaVA run's targets as
    `llava_train.lora_targets` picks them), and so do partial fine-tuning's (`freeze.trained_modules`), on the model
    built on the meta device: a TunelabError before any weight is read. Nothing to check for full fine-tuning of
    every weight."""
    if cfg.method == "full":
        if partial(cfg):
            trained_modules(empty_model(cfg), cfg)
        return
    model = empty_model(cfg)
    name = cfg.pretrained_model_name_or_path
    if cfg.visual_encoder_name_or_path:
        from tunelab.model.llava_train import lora_targets

        # the language model's targets are checked by lora_targets; lora_modules_to_save here
        check_lora_targets(model, "all-linear", name, cfg.lora_modules_to_save)
        lora_targets(model, cfg.lora_target_modules, cfg.visual_encoder_lora)
    else:
        check_lora_targets(model, cfg.lora_target_modules, name, cfg.lora_modules_to_save)


def empty_model(cfg) -> torch.nn.Module:
    """The model `cfg` trains (before peft wraps it), from config files alone, on the meta device: a causal LM (the
    sequence classifier of a reward model), or the LLaVA model assembled from its language model and vision tower."""
    llm = empty_causal_lm(cfg.pretrained_model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                          reward_head=cfg.objective == "reward" and not cfg.visual_encoder_name_or_path)
    if not cfg.visual_encoder_name_or_path:
        return llm
    from transformers import CLIPVisionModel, SiglipVisionModel

    from tunelab.model import llava

    tower_config = llava.vision_config(cfg.visual_encoder_name_or_path)
    tower_class = CLIPVisionModel if llava.vision_family(cfg.visual_encoder_name_or_path) == "clip" else \
        SiglipVisionModel
    with torch.device("meta"):
        tower = tower_class(tower_config)
    # the image token's id only sizes a vocabulary row (names stay): any id the vocabulary has will do
    return llava.assemble(llm, tower, image_token_id=0, feature_layer=cfg.vision_feature_layer,
                          select_strategy=cfg.vision_feature_select_strategy,
                          projector_hidden_act=cfg.projector_hidden_act)


def empty_causal_lm(path: str, *, trust_remote_code: bool = False, reward_head: bool = False,
                    key: str = "pretrained_model_name_or_path") -> torch.nn.Module:
    """The model `load.load_causal_lm` loads from `path`, built on the meta device from its config.json (the
    directory and architecture checked as there): InternLM2 as its native Llama graph."""
    model_dir = resolve_model_dir(path, key=key)
    config = read_model_config(model_dir, key=key)
    how = check_architecture(config, model_dir, trust_remote_code=trust_remote_code)
    model_config = build_config(model_dir, config, how, **({"num_labels": 1} if reward_head else {}))
    with torch.device("meta"):
        return new_model(how, reward_head, model_config)


def check_lora_targets(model, targets, model_name: str, modules_to_save=None) -> None:
    """Every entry of lora_target_modules and lora_modules_to_save names modules of this model. peft passes over a
    target entry that matches nothing as long as another entry matches, and over a lora_modules_to_save entry that
    matches nothing at all, so a typo would train fewer modules than asked, silently."""
    names = [name for name, _ in model.named_modules() if name]
    missing_saved = [m for m in modules_to_save or () if not names_module(m, names)]
    if missing_saved:
        embeddings = [name for name, module in model.named_modules()
                      if module is model.get_input_embeddings() or module is model.get_output_embeddings()]
        suggestion = sorted({name.rsplit(".", 1)[-1] for name in embeddings}, reverse=True)
        raise TunelabError(f"lora_modules_to_save: {', '.join(map(repr, missing_saved))} matches no module of "
                           f"{model_name}. Its embedding and output layers are named {suggestion}: e.g. "
                           f"lora_modules_to_save = {suggestion!r}.")
    if targets == "all-linear":
        return
    if isinstance(targets, str):  # peft reads a string as a regular expression over the full module names
        try:
            missing = [] if any(re.fullmatch(targets, name) for name in names) else [targets]
        except re.error as exc:
            raise TunelabError(f"lora_target_modules = {targets!r}: not a valid regular expression ({exc}). Use "
                               f"'all-linear' or a list of module names like ['q_proj', 'v_proj'].") from None
        if missing and names_module(targets, names):  # 'q_proj': a name, where peft reads a pattern
            raise TunelabError(f"lora_target_modules = {targets!r}: a string is a regular expression over whole "
                               f"module names (as peft reads it), and {targets!r} matches none of them (they read "
                               f"like {next(n for n in names if n.endswith('.' + targets))!r}). For the modules "
                               f"named so, write a list: lora_target_modules = [{targets!r}].")
    else:
        missing = [t for t in targets if not names_module(t, names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and "lm_head" not in name})
        raise TunelabError(f"lora_target_modules: {', '.join(map(repr, missing))} matches no module of {model_name}. "
                           f"Its linear layers are named {linear}: e.g. lora_target_modules = {linear[:2]!r}, or "
                           f"'all-linear' for all of them.")
