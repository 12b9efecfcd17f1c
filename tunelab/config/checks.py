"""Checking settings: one value against its field's type and rule, settings that exclude each other, other tools'
names for ours, and retired switches. Every message names the file (or --cfg-options), the setting and its line.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

from tunelab.config.schema import TrainConfig, default_value, field_rule, field_types
from tunelab.config.typecheck import check_type, describe_type, did_you_mean
from tunelab.errors import TunelabError

# --- checking values -----------------------------------------------------------------------------------------------

# Names other tools use for the same setting: a user coming from them gets pointed at ours.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "max_epochs", "epochs": "max_epochs",
    "gradient_accumulation_steps": "accumulative_counts", "per_device_train_batch_size": "batch_size",
    "batch_size_per_device": "batch_size", "model_name_or_path": "pretrained_model_name_or_path",
    "cutoff_len": "max_length", "max_seq_length": "max_length", "lora_rank": "lora_r",
    "template": "prompt_template", "alpaca_en_path": "data_path", "data_files": "data_path",
    "dataset": "data_path", "quantization_bit": "quant_bits", "load_in_4bit": "quant_bits",
    "finetuning_type": "method", "freeze_trainable_layers": "trainable_layers",
    "freeze_trainable_modules": "trainable_modules", "freeze_extra_modules": "trainable_extra_modules",
    "stage": "objective", "pref_beta": "beta", "pref_loss": "dpo_loss",
}


# XTuner's PART 1 names that tunelab has no setting for, because it does what they ask without one: a config that
# keeps them is told so (and to delete the line), not to rename them as helpers.
NOT_NEEDED = {
    "use_varlen_attn": "tunelab always keeps packed samples apart (varlen attention on a GPU, masks elsewhere)",
    "dataloader_num_workers": "tunelab's data is prepared and cached before training",
}


def suggest_setting(word: str) -> str:
    """" Did you mean 'lr'?" for a name that is not a setting (a typo, or another tool's name for one), or why
    tunelab needs no setting for it."""
    if word in NOT_NEEDED:
        return f" It is XTuner's: {NOT_NEEDED[word]}, so there is no such setting; delete the line."
    return did_you_mean(word, sorted(field_types()), ALIASES)


def where(source: str, key: str, line: int | None = None) -> str:
    """How an error names a setting: "cfg.py: 'lr' (line 3)", "--cfg-options: 'lr'"."""
    return f"{source}: '{key}'" + (f" (line {line})" if line else "")


def check_setting(key: str, value: Any, source: str, line: int | None = None) -> tuple[Any, str | None]:
    """(normalised value, error message or None) for one setting. `source` is the file or "--cfg-options"."""
    hint = field_types()[key]
    at = where(source, key, line)
    ok, value = check_type(value, hint)
    if not ok:
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        hint_text = did_you_mean(value, choices) if choices and isinstance(value, str) else ""
        example = f"{key} = {default_value(key)!r}"
        if "a function" in describe_type(hint):
            example = f"def my_map_fn(record): ... in the same file, then {key} = my_map_fn (no quotes)"
        return value, (f"{at} must be {describe_type(hint)}; got {value!r} "
                       f"({type(value).__name__}).{hint_text} For example: {example}")
    if not _finite(value):  # inf passes "greater than 0" (lr = 1e999), NaN fails every rule with a puzzling message
        return value, f"{at} must be a finite number; got {value!r}. For example: {key} = {default_value(key)!r}"
    rule = field_rule(key)
    if rule is not None and not rule.test(value):
        if rule.problem is not None:
            return value, f"{at}: {rule.problem(value)}"
        aliases = rule.aliases() if rule.aliases else None
        extra = did_you_mean(value, rule.choices(), aliases) if rule.choices and isinstance(value, str) else ""
        return value, f"{at} must be {rule.requirement()}; got {value!r}.{extra}"
    return value, None


def _finite(value: Any) -> bool:
    """No float in the value (or in a tuple / list of it) is inf or NaN."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return True


def combination_errors(cfg: TrainConfig, places: dict[str, tuple[str, int | None]] | None = None) -> list[str]:
    """Settings that are fine alone but impossible together. `places`: key -> (source, line), for the messages."""
    def at(key: str) -> str:
        if not places or key not in places:
            return ""
        source, line = places[key]
        return where(source, key, line) + ": "

    errors = []
    if cfg.method == "full" and cfg.quant_bits is not None and not cfg.freeze_llm:
        errors.append(f"{at('quant_bits')}method = 'full' with quant_bits = {cfg.quant_bits}: a quantised base cannot "
                      f"be fully fine-tuned. Use method = 'qlora', or quant_bits = None.")
    if not cfg.visual_encoder_name_or_path:
        used = [k for k in MULTIMODAL_ONLY if getattr(cfg, k) != default_value(k)]
        if used:
            errors.append(f"{at(used[0])}{used[0]} is a setting of multimodal (LLaVA) training, but "
                          f"visual_encoder_name_or_path is not set. Set it to a CLIP or SigLIP model to train a LLaVA "
                          f"model (docs/MULTIMODAL.md), or remove {', '.join(used)}.")
    if cfg.freeze_llm and cfg.method != "full":
        errors.append(f"{at('freeze_llm')}freeze_llm = True trains the projector alone, but method = {cfg.method!r} "
                      f"puts adapters on the language model. Stage 1 (pretrain): method = 'full' with freeze_llm = "
                      f"True; stage 2: freeze_llm = False.")
    if cfg.visual_encoder_lora and cfg.method == "full":
        errors.append(f"{at('visual_encoder_lora')}visual_encoder_lora = True puts LoRA adapters on the vision tower: "
                      f"use method = 'lora' or 'qlora'.")
    if isinstance(cfg.evaluation_images, list) and len(cfg.evaluation_images) not in (0, 1, len(cfg.evaluation_inputs)):
        errors.append(f"{at('evaluation_images')}evaluation_images lists {len(cfg.evaluation_images)} pictures for "
                      f"{len(cfg.evaluation_inputs)} evaluation_inputs: give one for all, or one per question.")
    if cfg.visual_encoder_name_or_path and cfg.objective != "sft":
        errors.append(f"{at('objective')}objective = {cfg.objective!r} with a vision tower: tunelab trains LLaVA models "
                      f"with supervised fine-tuning only (objective = 'sft').")
    if cfg.visual_encoder_name_or_path and cfg.sequence_parallel_size > 1:
        errors.append(f"{at('sequence_parallel_size')}sequence_parallel_size = {cfg.sequence_parallel_size} with a "
                      f"vision tower: LLaVA rows are not split over GPUs (their image features go into whole rows). "
                      f"Set sequence_parallel_size = 1.")
    if cfg.sequence_parallel_size > 1 and not cfg.fast_path:
        errors.append(f"{at('sequence_parallel_size')}sequence_parallel_size = {cfg.sequence_parallel_size} with "
                      f"fast_path = False: splitting rows over GPUs runs through tunelab's attention and loss, which "
                      f"fast_path = False turns off. Set fast_path = True, or sequence_parallel_size = 1.")
    if cfg.sequence_parallel_size > 1 and _lora_on_lm_head(cfg):
        errors.append(f"{at('lora_target_modules')}lora_target_modules puts an adapter on lm_head, which the loss of "
                      f"rows split over GPUs (sequence_parallel_size = {cfg.sequence_parallel_size}) cannot run "
                      f"through. Train lm_head whole instead (lora_modules_to_save = ['lm_head']), or set "
                      f"sequence_parallel_size = 1.")
    if cfg.visual_encoder_name_or_path and cfg.rope_scaling:
        errors.append(f"{at('rope_scaling')}rope_scaling = {cfg.rope_scaling!r} with a vision tower: tunelab scales "
                      f"the RoPE of text models only. Set rope_scaling = None, and max_length up to the language "
                      f"model's max_position_embeddings.")
    if cfg.neftune_noise_alpha is not None and cfg.objective != "sft":
        errors.append(f"{at('neftune_noise_alpha')}neftune_noise_alpha = {cfg.neftune_noise_alpha} with objective = "
                      f"{cfg.objective!r}: NEFTune is a supervised fine-tuning method (noise in the policy's "
                      f"embeddings alone would score chosen and rejected replies against a reference without it). "
                      f"Set neftune_noise_alpha = None.")
    # An answer longer than any training sequence shows nothing about training, and a slip (10**9) would generate until
    # it ends (or fail inside transformers). The default is cut to max_length instead (train.evaluate), as chat cuts
    # a default max_tokens to the context: a short max_length alone does not make a config wrong.
    if cfg.eval_max_new_tokens > cfg.max_length and cfg.eval_max_new_tokens != default_value("eval_max_new_tokens"):
        errors.append(f"{at('eval_max_new_tokens')}eval_max_new_tokens = {cfg.eval_max_new_tokens} is more than "
                      f"max_length = {cfg.max_length}: an evaluation answer would be longer than any sequence the "
                      f"model trains on. Set eval_max_new_tokens to {cfg.max_length} or less.")
    if cfg.nonfinite == "skip" and cfg.deepspeed:
        errors.append(f"{at('nonfinite')}nonfinite = 'skip' with deepspeed: DeepSpeed's engine takes the optimiser step "
                      f"itself, so a step cannot be left out. Use nonfinite = 'stop' (the default) with deepspeed.")
    return errors + _lora_errors(cfg, at) + _partial_errors(cfg, at) + _preference_errors(cfg, at)


# LoRA settings a user adds to a config on purpose (the config template writes lora_r, lora_alpha, lora_dropout and
# lora_target_modules for every method, saying that method = 'full' does not read them).
LORA_ONLY = ("use_dora", "use_rslora", "lora_bias", "lora_modules_to_save", "loraplus_lr_ratio")


def _lora_errors(cfg: TrainConfig, at) -> list[str]:
    errors = []
    if cfg.method == "full":
        for key in LORA_ONLY:
            value = getattr(cfg, key)
            if value != default_value(key):
                errors.append(f"{at(key)}{key} = {value!r} is a LoRA setting, which method = 'full' does not read "
                              f"(every weight trains). Use method = 'lora' or 'qlora', or remove {key}.")
        return errors
    targets = cfg.lora_target_modules
    saved = {name.rsplit(".", 1)[-1] for name in cfg.lora_modules_to_save or ()}
    both = [t for t in targets if t.rsplit(".", 1)[-1] in saved] if isinstance(targets, list) else []
    if both:  # peft wraps the module whole and leaves the adapter out, without a word
        errors.append(f"{at('lora_modules_to_save')}{both[0]!r} is in lora_target_modules and in "
                      f"lora_modules_to_save: peft trains a module of lora_modules_to_save whole and puts no "
                      f"adapter on it. Keep it in one of them: lora_modules_to_save to train it whole, "
                      f"lora_target_modules for an adapter.")
    return errors


# Partial fine-tuning's settings (method = 'full'): what trains, each name checked against the model before loading
# (tunelab.model.freeze).
PARTIAL = ("trainable_layers", "trainable_modules", "trainable_extra_modules")


def _partial_errors(cfg: TrainConfig, at) -> list[str]:
    used = [key for key in PARTIAL if getattr(cfg, key) != default_value(key)]
    if not used:
        return []
    key, value = used[0], getattr(cfg, used[0])
    if cfg.method != "full":  # peft freezes the base itself and trains its adapters: these would be ignored
        return [f"{at(key)}{key} = {value!r} chooses the weights that train whole, a setting of method = 'full' "
                f"(partial fine-tuning); method = {cfg.method!r} trains LoRA adapters on lora_target_modules "
                f"instead. Use method = 'full', or remove {', '.join(used)}."]
    if cfg.visual_encoder_name_or_path:
        return [f"{at(key)}{key} with a vision tower: a LLaVA run chooses what trains with freeze_llm and "
                f"visual_encoder_lora. Remove {', '.join(used)}."]
    # (a reward model's new score head trains whatever they say: trained alone, it is a linear probe)
    if cfg.trainable_layers == 0 and not cfg.trainable_extra_modules and cfg.objective != "reward":
        return [f"{at('trainable_layers')}trainable_layers = 0 trains no decoder layer and trainable_extra_modules "
                f"names nothing else: nothing would train. Name modules outside the layers (e.g. "
                f"trainable_extra_modules = ['lm_head']), or train the last layers (e.g. trainable_layers = 2)."]
    if cfg.trainable_layers == 0 and cfg.trainable_modules != "all":
        return [f"{at('trainable_modules')}trainable_modules = {cfg.trainable_modules!r} names modules within the "
                f"trained layers, but trainable_layers = 0 trains none. Remove trainable_modules, or set "
                f"trainable_layers."]
    return []


def _lora_on_lm_head(cfg: TrainConfig) -> bool:
    from tunelab.model.plan import lora_on_lm_head

    return lora_on_lm_head(cfg)


def _shards_weights(cfg: TrainConfig) -> bool:
    """FSDP, or ZeRO-3 by preset or by a DeepSpeed .json's stage (an unreadable .json is reported when training
    builds the DeepSpeed config, with the file's own error)."""
    from tunelab.model.memory import sharded_by_engine

    try:
        return "weights" in sharded_by_engine(cfg)
    except TunelabError:
        return False


def _preference_errors(cfg: TrainConfig, at) -> list[str]:
    errors = []
    objective = cfg.objective
    if objective == "sft":
        return errors
    if cfg.resolved_reference() == "adapters_off" and cfg.method == "full":
        errors.append(f"{at('reference')}reference = 'adapters_off' with method = 'full': there are no adapters to "
                      f"switch off. Use reference = 'copy' or 'precomputed' (or 'auto').")
    if cfg.reference == "copy" and _shards_weights(cfg):  # 'auto' precomputes there (model.fit.choose_reference)
        errors.append(f"{at('reference')}reference = 'copy' keeps a whole frozen copy on every GPU, which FSDP / ZeRO-3 "
                      f"would not shard. Use reference = 'precomputed'.")
    if cfg.label_smoothing and not (objective == "simpo" or (objective == "dpo" and cfg.dpo_loss == "sigmoid")):
        errors.append(f"{at('label_smoothing')}label_smoothing = {cfg.label_smoothing} is read by DPO's sigmoid loss "
                      f"and by SimPO only, not by objective = '{objective}'"
                      + (f" with dpo_loss = '{cfg.dpo_loss}'" if objective == "dpo" else "") + ". Set it to 0.")
    if cfg.train_on == "all":
        errors.append(f"{at('train_on')}train_on = 'all' with objective = '{objective}': preference training scores "
                      f"the final reply of each sequence only. Remove train_on (or set it to 'assistant').")
    if cfg.sequence_parallel_size > 1:
        errors.append(f"{at('sequence_parallel_size')}sequence_parallel_size = {cfg.sequence_parallel_size} with "
                      f"objective = '{objective}': splitting rows over GPUs runs the supervised loss only; preference "
                      f"objectives score whole sequences on one GPU. Set sequence_parallel_size = 1.")
    if objective == "reward" and cfg.evaluation_inputs and cfg.evaluation_inputs != default_value("evaluation_inputs"):
        errors.append(f"{at('evaluation_inputs')}evaluation_inputs with objective = 'reward': a reward model scores "
                      f"replies and answers no questions. Remove them (evaluation_inputs = []); held-out pairs "
                      f"(eval_split_ratio) report its eval_accuracy.")
    for key, readers in READ_BY.items():  # another objective's setting (kto with dpo_loss = 'ipo'): not ignored
        value = getattr(cfg, key)
        if objective not in readers and value != default_value(key):
            names = " or ".join(", ".join(f"'{r}'" for r in readers).rsplit(", ", 1))
            errors.append(f"{at(key)}{key} = {value!r} is read by objective = {names} only, not by objective = "
                          f"'{objective}': remove it, or set the objective it is meant for.")
    return errors


# The preference settings each objective reads (label_smoothing: above, as it also depends on dpo_loss).
READ_BY = {"beta": ("dpo", "orpo", "simpo", "kto"), "dpo_loss": ("dpo",), "simpo_gamma": ("simpo",),
           "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",), "reference": ("dpo", "kto")}


# Settings that only a run with a vision tower reads (a text run that sets one is told, not ignored).
MULTIMODAL_ONLY = ("freeze_llm", "visual_encoder_lora", "pretrained_pth", "image_folder", "evaluation_images")


# --- settings that are gone ----------------------------------------------------------------------------------------

# Switches of levers that compute the plain path's numbers: those levers are always part of the fast path.
RETIRED_SETTINGS = {
    "use_varlen_attention": "varlen flash attention over packed rows",
    "use_chunked_loss": "the chunked loss over trained tokens",
    "lean_lora": "the lean LoRA forward",
    "qlora_fused_dequant": "the 4-bit dequantisation fused by compile",
    "cudnn_attention": "cuDNN attention for rows of one sample",
}


def check_retired(key: str, value: Any, source: str, line: int | None = None) -> tuple[str | None, str | None]:
    """(note, error) for a setting of RETIRED_SETTINGS. `= True` (what it was by default) loads with a note; anything
    else asks for a lever off alone, which is not possible any more: an error that says what to do instead."""
    at, lever = where(source, key, line), RETIRED_SETTINGS[key]
    if value is True:
        return (f"{at}: {lever} is always part of the fast path, so this setting is not needed (and not read); "
                f"delete the line."), None
    return None, (f"{at} = {value!r}: {lever} is always part of the fast path (it computes the same numbers as the "
                  f"plain path) and cannot be turned off alone. Delete the line, or set fast_path = False to run "
                  f"transformers and peft as they come (for debugging: slower, more memory).")
