"""The LLaVA model a run trains, and the same model rebuilt for export (the assembly itself: `tunelab.model.llava`).

Which parts learn; the rest is frozen:

| settings | trained |
|---|---|
| `freeze_llm = True` (stage 1, "pretrain") | the projector |
| `method = 'full'` | the projector and every weight of the language model |
| `method = 'lora'` / `'qlora'` | the projector and LoRA adapters on the language model's linear layers (qlora: over its 4-bit weights); with `visual_encoder_lora`, on the vision tower's too |

The vision tower is frozen otherwise, held in the compute dtype; frozen, it runs under no_grad. The projector starts
new, or from `pretrained_pth` (the stage-1 run). LoRA adapters are a peft adapter of the whole
LlavaForConditionalGeneration with the projector among its `modules_to_save`, so one adapter file holds everything
trained, and export rebuilds the same base (`rebuild_for_export`: the language model, the tower, the image token) to
merge it into.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.model import llava
from tunelab.model.load import checkpoint_layers, load_causal_lm, resolve_dtype
from tunelab.model.tokenizer import load_tokenizer

PROJECTOR = "multi_modal_projector"


def llava_settings(cfg) -> dict:
    """The settings that make the assembly, as recorded in tunelab.json (so export rebuilds it from them)."""
    return {"visual_encoder": cfg.visual_encoder_name_or_path, "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "projector_hidden_act": cfg.projector_hidden_act, "image_pad_to_square": cfg.image_pad_to_square,
            "freeze_llm": cfg.freeze_llm, "visual_encoder_lora": cfg.visual_encoder_lora}


def _assemble(llm_path: str, settings: dict, *, dtype, device, bits=None, trust_remote_code=False,
              prepare_llm=None):
    tokenizer = load_tokenizer(llm_path, trust_remote_code=trust_remote_code)
    image_id = llava.add_image_token(tokenizer)
    llm = load_causal_lm(llm_path, dtype=dtype, device=device, bits=bits, trust_remote_code=trust_remote_code)
    llava.resize_for_image_token(llm, image_id)
    if prepare_llm is not None:
        llm = prepare_llm(llm)
    tower_dtype = dtype if isinstance(dtype, torch.dtype) else llm.get_input_embeddings().weight.dtype
    tower = llava.load_vision_tower(settings["visual_encoder"], dtype=tower_dtype, device=device)
    tower.requires_grad_(False)
    return llava.assemble(llm, tower, image_token_id=image_id, feature_layer=settings["vision_feature_layer"],
                          select_strategy=settings["vision_feature_select_strategy"],
                          projector_hidden_act=settings["projector_hidden_act"])


def build_for_training(cfg, device: torch.device, *, checkpointing: bool):
    """The LlavaForConditionalGeneration `cfg` trains (peft-wrapped for lora / qlora), on `device`, without the fast
    path (the caller switches it on, on the language model)."""
    dtype = resolve_dtype(cfg.dtype, device)
    bits = cfg.resolved_quant_bits()  # (the settings were checked together: tunelab.config.checks.combination_errors)

    def prepare(llm):
        llm.config.use_cache = False
        if bits and cfg.method != "full":
            from peft import prepare_model_for_kbit_training

            llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)  # checkpointing: below
        if checkpointing:
            checkpoint_layers(llm)
        return llm

    model = _assemble(cfg.pretrained_model_name_or_path, llava_settings(cfg), dtype=dtype, device=device, bits=bits,
                      trust_remote_code=cfg.trust_remote_code, prepare_llm=prepare)
    if cfg.pretrained_pth:
        load_projector(model, cfg.pretrained_pth)
    if cfg.freeze_llm or cfg.method == "full":
        model.model.language_model.requires_grad_(not cfg.freeze_llm)
        model.lm_head.requires_grad_(not cfg.freeze_llm)
        model.model.multi_modal_projector.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    # lora_modules_to_save and lora_target_modules were checked before loading (targets.py)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(model, cfg.lora_target_modules, cfg.visual_encoder_lora),
                      bias=cfg.lora_bias, modules_to_save=[PROJECTOR, *(cfg.lora_modules_to_save or [])],
                      use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def lora_targets(model, wanted, on_tower: bool = False) -> list[str]:
    """Full names of the linear layers LoRA goes on: those of the language model (and the vision tower, if asked)
    that `wanted` names ('all-linear', or names like ['q_proj', 'v_proj']). Never the projector (trained whole)
    nor lm_head; an entry that names none of them is an error, not passed over."""
    roots = ("model.language_model.",) + (("model.vision_tower.",) if on_tower else ())
    linear = [name for name, module in model.named_modules()
              if name.startswith(roots) and isinstance(module, torch.nn.Linear)]
    if not linear:
        raise TunelabError("lora_target_modules: the language model has no linear layer to put LoRA on. Use "
                           "method = 'full', or freeze_llm = True to train the projector alone.")
    if wanted == "all-linear":
        return linear
    known = sorted({name.rsplit(".", 1)[-1] for name in linear})
    if isinstance(wanted, str):  # a regular expression elsewhere (peft); here the names are matched one by one
        raise TunelabError(f"lora_target_modules = {wanted!r}: a LLaVA run takes 'all-linear' or a list of the "
                           f"language model's linear layer names, not a regular expression: e.g. "
                           f"lora_target_modules = {known[:2]!r}.")
    missing = [w for w in wanted if w not in known]
    if missing:
        head = " (lm_head trains whole with lora_modules_to_save = ['lm_head'])" if "lm_head" in missing else ""
        raise TunelabError(f"lora_target_modules: {', '.join(map(repr, missing))} names no linear layer of the "
                           f"language model{' or vision tower' if on_tower else ''}{head}. Its linear layers are "
                           f"named {known}: use some of them, or 'all-linear'.")
    return [name for name in linear if name.rsplit(".", 1)[-1] in wanted]


# --- the projector of stage 1 ----------------------------------------------------------------------------------

def projector_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The projector's weights (names as in LlavaMultiModalProjector) from a checkpoint (iter_N), its model/ folder,
    an adapter or a HF LLaVA export: whatever safetensors there hold `multi_modal_projector.` weights."""
    from safetensors import safe_open

    path = Path(path)
    folders = [path, path / "model"]
    files = [f for folder in folders if folder.is_dir() for f in sorted(folder.glob("*.safetensors"))]
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if f"{PROJECTOR}." in key:
                    found[key.split(f"{PROJECTOR}.", 1)[1].replace("modules_to_save.default.", "")] = f.get_tensor(key)
    if not found:
        raise TunelabError(f"pretrained_pth = {str(path)!r}: no projector weights there (looked for "
                           f"'{PROJECTOR}.*' in the *.safetensors of {' and '.join(map(str, folders))}). Point it at "
                           "the stage-1 checkpoint (WORK_DIR/iter_N) or its export.")
    return found


def load_projector(model, path: str | Path) -> None:
    projector = llava.llava_model(model).model.multi_modal_projector
    weights = projector_weights(path)
    own = projector.state_dict()
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        raise TunelabError(f"pretrained_pth = {str(path)!r}: its projector {shapes} does not fit this model's "
                           f"{ {k: tuple(v.shape) for k, v in own.items()} }: was stage 1 trained with another "
                           "language model or vision tower?")
    projector.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


# --- export ------------------------------------------------------------------------------------------------------

def rebuild_for_export(meta: dict, model_dir: Path, *, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The trained LlavaForConditionalGeneration of a checkpoint's model/ folder (LoRA merged in), rebuilt from the
    base the run started from (tunelab.json's base_model and llava settings) and the weights it trained."""
    settings = meta.get("llava")
    if not settings or not meta.get("base_model"):
        raise TunelabError(f"{model_dir}: its tunelab.json does not say which language model and vision tower the "
                           "LLaVA run assembled; pass the training config too (tunelab convert pth_to_hf CONFIG ...).")
    model = _assemble(meta["base_model"], settings, dtype=dtype, device=device)
    if settings.get("freeze_llm"):  # stage 1 trained the projector alone
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    load_trained_weights(model, model_dir)
    return model


def load_trained_weights(model, model_dir: Path) -> None:
    """A checkpoint's weights into the assembled model: every weight it holds must fit, and the weights it does not
    hold must be frozen ones (stage 1 saves the projector alone; the vision tower is never saved when frozen)."""
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(file))
    inner = llava.llava_model(model)
    missing, unexpected = inner.load_state_dict(weights, strict=False)
    params = dict(inner.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in weights if name in params}  # a tied lm_head is loaded with embed_tokens
    not_saved = sorted(name for name in missing if name in params and params[name].requires_grad
                       and id(params[name]) not in loaded)
    if unexpected or not_saved:
        raise TunelabError(f"{model_dir}: its weights do not fit this LLaVA model (unexpected {unexpected[:3]}, "
                           f"trained but not saved {not_saved[:3]}). Use the config it was trained with.")
