"""Partial ("freeze") fine-tuning: which weights of a method = 'full' run train, as LLaMA-Factory's
`finetuning_type: freeze` chooses them (trainable_layers, trainable_modules, trainable_extra_modules).

One function, `trained_modules`, picks the modules from the model's own module names, so the same choice is made
where it is checked (on the model built on the meta device, before any weight is read: `targets.py`), where the
memory plan counts it (`trained_part`) and where training freezes the rest (`freeze_the_rest`). What it picks trains
as in full fine-tuning (fp32 master weights, AdamW states); everything else is frozen as LoRA's base is, which the
rest of tunelab reads from `requires_grad` alone: no gradient or optimiser state (`train.optim.parameter_groups`),
kept in the compute dtype (`train.optim.choose_precision` upcasts trained weights only), and no backward through
the layers before the first trained one (autograd records nothing there).

Where LLaMA-Factory matches names as substrings of parameter names (its 'norm' also trains every layer's
input_layernorm), a name here is a whole module name or its last dotted parts, as lora_target_modules are matched.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.model.model_dir import new_model
from tunelab.model.parts import decoder_layers
from tunelab.model.plan import names_module


def partial(cfg) -> bool:
    """Only some weights of a method = 'full' run train: one of the three settings is set."""
    return cfg.method == "full" and (cfg.trainable_layers is not None or cfg.trainable_modules != "all"
                                     or cfg.trainable_extra_modules is not None)


def trained_layer_ids(count: int, trainable_layers: int | None) -> range:
    """The indices of the decoder layers that train: the last N (N > 0), the first |N| (N < 0), none (0), all
    (None)."""
    if trainable_layers is None:
        return range(count)
    if trainable_layers > 0:
        return range(count - trainable_layers, count)
    return range(-trainable_layers)


def layer_names(model) -> list[str]:
    """The whole module names of the decoder layers, in order."""
    where = {id(module): name for name, module in model.named_modules()}
    return [where[id(layer)] for layer in decoder_layers(model)]


def trained_modules(model, cfg) -> list[str]:
    """The whole names of the modules of `model` that train under `cfg`'s partial settings. A TunelabError names the
    setting and the fix for a layer count past the model's, or a name that matches no module."""
    model_name = cfg.pretrained_model_name_or_path
    layers = layer_names(model)
    if not layers:
        raise TunelabError(f"trainable_layers / trainable_modules: {model_name} keeps no decoder layers where tunelab "
                           f"looks (model.layers), so they cannot be chosen. Remove them to train every weight.")
    n = cfg.trainable_layers
    if n is not None and abs(n) > len(layers):
        raise TunelabError(f"trainable_layers = {n}: {model_name} has {len(layers)} decoder layers. Use at most "
                           f"{len(layers)} (or -{len(layers)}), or None to train them all.")
    inside = {layer: [name[len(layer) + 1:] for name, _ in model.get_submodule(layer).named_modules(prefix=layer)
                      if name != layer] for layer in layers}
    chosen = []
    for i in trained_layer_ids(len(layers), n):
        layer = layers[i]
        if cfg.trainable_modules == "all":
            chosen.append(layer)
        else:
            chosen += [f"{layer}.{rel}" for rel in inside[layer]
                       if any(names_module(m, [rel]) for m in cfg.trainable_modules)]
    if cfg.trainable_modules != "all":
        every = sorted({rel for rels in inside.values() for rel in rels})
        missing = [m for m in cfg.trainable_modules if not names_module(m, every)]
        if missing:
            children = sorted({rel for rel in every if "." not in rel})
            raise TunelabError(f"trainable_modules: {', '.join(map(repr, missing))} matches no module of a decoder "
                               f"layer of {model_name}. Its layers hold {children} (and their parts, e.g. "
                               f"{next((r for r in every if '.' in r), children[0])!r}): e.g. trainable_modules = "
                               f"{children[-1:]!r}, or 'all'.")
    outside = _outside_layers(model, layers)
    missing = [m for m in cfg.trainable_extra_modules or () if not names_module(m, outside)]
    if missing:
        holders = sorted({name.rsplit(".", 1)[-1] for name in outside
                          if next(model.get_submodule(name).parameters(recurse=False), None) is not None})
        raise TunelabError(f"trainable_extra_modules: {', '.join(map(repr, missing))} matches no module of "
                           f"{model_name} outside its decoder layers. Those with weights are named {holders}: e.g. "
                           f"trainable_extra_modules = {holders[-1:]!r}.")
    chosen += [name for name in outside if any(names_module(m, [name]) for m in cfg.trainable_extra_modules or ())]
    if cfg.objective == "reward" and "score" in outside:  # the reward head is new: frozen, it would stay random
        chosen.append("score")
    return chosen


def _outside_layers(model, layers: list[str]) -> list[str]:
    """The module names that are neither a decoder layer, inside one, nor around them (the decoder itself, whose
    training would be every layer's)."""
    def related(name: str) -> bool:
        return any(name == layer or name.startswith(layer + ".") or layer.startswith(name + ".") for layer in layers)

    return [name for name, _ in model.named_modules() if name and not related(name)]


def freeze_the_rest(model, cfg) -> None:
    """Freeze every weight of `model` but those `trained_modules` picks."""
    names = trained_modules(model, cfg)
    model.requires_grad_(False)
    for name in names:
        model.get_submodule(name).requires_grad_(True)


def describe_trained(model) -> str:
    """What trains, for the log: '36,992 of 161,856 parameters: model.layers.1, lm_head'."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    names = [name for name, module in model.named_modules() if name and _trains_whole(module)]
    names = [n for n in names if not any(n.startswith(m + ".") for m in names)]  # the outermost ones
    shown = ", ".join(names) if len(names) <= 6 else ", ".join(names[:3] + ["...", *names[-2:]])
    return f"{trained:,} of {total:,} parameters: {shown}"


def _trains_whole(module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


@dataclass(frozen=True)
class TrainedPart:
    """What a partial run trains, as the memory plan needs it."""

    params: int
    """Parameters that train (a tied embedding and lm_head once)."""
    backward_layers: int
    """Decoder layers backward runs through: from the first trained one (all, when the input embedding trains)."""
    lm_head: bool
    """lm_head trains."""
    total: int
    """Parameters of the model."""


def lm_head_trains(cfg) -> bool:
    """lm_head trains: full fine-tuning of every weight (not LLaVA's frozen language model), or with lm_head among
    partial fine-tuning's."""
    return cfg.method == "full" and not cfg.freeze_llm and (not partial(cfg) or trained_part(cfg).lm_head)


def trained_part(cfg) -> TrainedPart:
    """What a partial `cfg` trains, counted on its model built on the meta device (`targets.empty_model`): the same
    choice training makes, so the plan's count is the trained model's `requires_grad` count."""
    key = (cfg.pretrained_model_name_or_path, cfg.trust_remote_code, cfg.objective, cfg.trainable_layers,
           _frozen(cfg.trainable_modules), _frozen(cfg.trainable_extra_modules))
    if key not in _COUNTED:  # `tunelab plan` estimates several variants of one config
        _COUNTED[key] = _count(cfg)
    return _COUNTED[key]


_COUNTED: dict[tuple, TrainedPart] = {}


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def _count(cfg) -> TrainedPart:
    model = _meta_model(cfg)
    freeze_the_rest(model, cfg)  # (asked of partial runs only: `partial`)
    layers = decoder_layers(model)
    first = next((i for i, layer in enumerate(layers) if _trains_any(layer)), len(layers))
    backward = len(layers) if _trains_any(model.get_input_embeddings()) else len(layers) - first
    head = model.get_output_embeddings()
    return TrainedPart(params=sum(p.numel() for p in model.parameters() if p.requires_grad), backward_layers=backward,
                       lm_head=head is not None and _trains_any(head), total=sum(p.numel() for p in model.parameters()))


def _trains_any(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _meta_model(cfg):
    """The model on the meta device: from its config files (`targets.empty_model`), or, for a hub model whose shape
    `tunelab plan` knows offline (`shapes.KNOWN_SHAPES`), the Llama-style model of that shape (InternLM2 loads as
    one), whose module names are the loaded model's."""
    from tunelab.model.shapes import KNOWN_SHAPES, local_config_file
    from tunelab.model.targets import empty_model

    name = cfg.pretrained_model_name_or_path
    if local_config_file(name) is not None or name not in KNOWN_SHAPES:
        return empty_model(cfg)
    import torch
    from transformers import AutoConfig

    shape = dict(KNOWN_SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type", "llama"), **shape, **(
        {"num_labels": 1} if cfg.objective == "reward" else {}))
    with torch.device("meta"):
        return new_model("native", cfg.objective == "reward", config)
