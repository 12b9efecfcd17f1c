"""The built-in configs behind `tunelab list-cfg` and `tunelab copy-cfg`.

A built-in config is a model × a method × a dataset, named `<model>_<method>_<dataset>_e<epochs>`,
e.g. `internlm2_1_8b_qlora_alpaca_e3`. Its text is `config_template.py.tmpl` filled in from the three
tables below. Adding a model is one line in MODELS. A dataset says what it trains (`objective`): the preference
datasets' names start with theirs (`qwen2_5_1_5b_qlora_dpo_ultrafeedback_e1`), so `list-cfg -p dpo` lists them.

A multimodal (LLaVA) config is a model × a vision tower × a stage, named `llava_<model>_<tower>_<stage>`, e.g.
`llava_internlm2_1_8b_clip_vit_large_p14_336_pretrain`: the same template with the multimodal settings added
(LLAVA_MODELS, VISION_TOWERS, LLAVA_STAGES; docs/MULTIMODAL.md).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import string
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

TEMPLATE_PATH = Path(__file__).with_name("config_template.py.tmpl")


@dataclass(frozen=True)
class Model:
    hub_id: str
    prompt_template: str
    max_length: int = 2048
    lora_target_modules: str | tuple = "all-linear"
    trust_remote_code: bool = False  # never on by default: InternLM2 loads as a native Llama graph


# name -> model. One line per model.
MODELS: dict[str, Model] = {
    "internlm2_1_8b": Model("internlm/internlm2-chat-1_8b", "internlm2_chat"),
    "internlm2_7b": Model("internlm/internlm2-chat-7b", "internlm2_chat"),
    "internlm2_20b": Model("internlm/internlm2-chat-20b", "internlm2_chat"),
    "internlm2_5_7b": Model("internlm/internlm2_5-7b-chat", "internlm2_chat"),
    "llama2_7b": Model("meta-llama/Llama-2-7b-chat-hf", "llama2_chat"),
    "llama3_8b": Model("meta-llama/Meta-Llama-3-8B-Instruct", "llama3_chat"),
    "llama3_1_8b": Model("meta-llama/Llama-3.1-8B-Instruct", "llama3_1_chat"),  # Unsloth's notebooks' Llama
    "qwen2_5_0_5b": Model("Qwen/Qwen2.5-0.5B-Instruct", "qwen2_5_chat"),
    "qwen2_5_1_5b": Model("Qwen/Qwen2.5-1.5B-Instruct", "qwen2_5_chat"),
    "qwen2_5_7b": Model("Qwen/Qwen2.5-7B-Instruct", "qwen2_5_chat"),
    "mistral_7b": Model("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
}


@dataclass(frozen=True)
class Method:
    lr: float
    batch_size: int
    accumulative_counts: int
    optimizer: str = "adamw"
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1


# Full fine-tuning moves every weight, so it wants a 10x smaller learning rate than adapters.
METHODS: dict[str, Method] = {
    "full": Method(lr=2e-5, batch_size=1, accumulative_counts=16),
    "lora": Method(lr=2e-4, batch_size=1, accumulative_counts=16),
    # QLoRA needs bitsandbytes anyway; its 8-bit AdamW states keep a 7B QLoRA step under 6 GiB (BENCHMARKS.md).
    "qlora": Method(lr=2e-4, batch_size=1, accumulative_counts=16, optimizer="adamw_8bit"),
}


@dataclass(frozen=True)
class Dataset:
    data_path: str
    data_format: str
    note: str  # a comment above data_path in the generated config
    system: str = ""
    epochs: int = 3
    evaluation_inputs: tuple = ("请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai")
    objective: str = "sft"
    preference: tuple = ()
    """(setting, value) of the preference settings block (docs/PREFERENCE.md), for the preference objectives."""
    lr_scale: float = 1.0
    """The learning rate is the method's times this: preference training moves much less than supervised."""
    max_length: int | None = None
    """Tokens of a sequence, if not the model's: a preference row holds two (prompt + chosen, prompt + rejected)."""


ULTRAFEEDBACK = ("# UltraFeedback pairs (TRL's binarized copy: 'chosen' / 'rejected' conversations) from the Hugging "
                 "Face hub;\n# your own pairs: a JSONL file of {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} "
                 "(docs/PREFERENCE.md).")


def _preference(objective: str, lr_scale: float, **settings) -> Dataset:
    """A preference dataset entry: UltraFeedback pairs (KTO: TRL's KTO mix) for one epoch, a sequence of 1024 tokens."""
    data_path, note = "trl-lib/ultrafeedback_binarized", ULTRAFEEDBACK
    if objective == "kto":
        data_path = "trl-lib/kto-mix-14k"
        note = ("# TRL's KTO mix (prompt / completion / label) from the Hugging Face hub; your own: a JSONL file of "
                "{\"prompt\": ..., \"completion\": ..., \"label\": true} (docs/PREFERENCE.md).")
    questions = () if objective == "reward" else Dataset.evaluation_inputs
    return Dataset(data_path, "auto", note=note, epochs=1, evaluation_inputs=questions, objective=objective,
                   preference=tuple(settings.items()), lr_scale=lr_scale, max_length=1024)


ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n")

DATASETS: dict[str, Dataset] = {
    "alpaca": Dataset(
        "tatsu-lab/alpaca", "alpaca", system=ALPACA_SYSTEM,
        note="# Alpaca (52k instructions) from the Hugging Face hub; offline, point data_path at a local copy."),
    "openai": Dataset(
        "./data/messages.jsonl", "messages",
        note='# Your own chats: a JSONL file, one {"messages": [{"role": "user", "content": "..."}, '
             '{"role": "assistant", "content": "..."}]} per line.'),
    "self_cognition": Dataset(
        "./data/self_cognition.json", "conversation",
        evaluation_inputs=("请介绍一下你自己", "who are you?"),
        note="# Teach the model who it is. Make the file first with `tunelab data self-cognition` "
             "(see `tunelab data self-cognition --help`)."),
    # Preference training: about 1/40 of the supervised learning rate (5e-6 for LoRA, 5e-7 full, as LLaMA-Factory's
    # and TRL's DPO examples); a reward model learns a new head, at half the supervised rate.
    "dpo_ultrafeedback": _preference("dpo", 1 / 40, beta=0.1, dpo_loss="sigmoid", reference="auto"),
    "orpo_ultrafeedback": _preference("orpo", 1 / 40, beta=0.1),
    "simpo_ultrafeedback": _preference("simpo", 1 / 40, beta=2.0, simpo_gamma=1.0),  # the SimPO paper's range
    "kto_mix": _preference("kto", 1 / 40, beta=0.1, kto_desirable_weight=1.0, kto_undesirable_weight=1.0,
                           reference="auto"),
    "reward_ultrafeedback": _preference("reward", 1 / 2),
}


PREFERENCE_NOTES = {
    "beta": "preference strength: DPO / KTO's beta, ORPO's lambda, SimPO's reward scale",
    "dpo_loss": "'sigmoid' (DPO), 'ipo' or 'hinge'",
    "reference": "'auto': the base with adapters off (lora/qlora), else a frozen copy or precomputed",
    "simpo_gamma": "SimPO's target margin",
    "kto_desirable_weight": "weigh desirable replies (raise the rarer kind's weight)",
    "kto_undesirable_weight": "weigh undesirable replies",
}


# --- multimodal (LLaVA) configs ---------------------------------------------------------------

@dataclass(frozen=True)
class VisionTower:
    hub_id: str
    select_strategy: str = "default"  # SigLIP has no CLS token to drop: 'full'


VISION_TOWERS: dict[str, VisionTower] = {
    "clip_vit_large_p14_336": VisionTower("openai/clip-vit-large-patch14-336"),  # LLaVA-1.5's: 576 tokens an image
    "siglip_so400m_p14_384": VisionTower("google/siglip-so400m-patch14-384", "full"),  # 729 tokens an image
}

LLAVA_MODELS = ("internlm2_1_8b", "internlm2_7b", "qwen2_5_7b", "llama3_8b")  # names in MODELS


@dataclass(frozen=True)
class LlavaStage:
    description: str
    method: str
    freeze_llm: bool
    lr: float
    data_path: str
    image_folder: str
    note: str
    batch_size: int = 4
    accumulative_counts: int = 16
    lora_r: int = 64
    lora_alpha: int = 16
    optimizer: str = "adamw"
    evaluation_inputs: tuple = ("Please describe this picture.", "请描述一下这张照片")


# LLaVA-1.5's two stages (and XTuner's llava configs): 1 epoch each, the projector at lr 1e-3 on 558k image-caption
# pairs, then projector + LoRA (r 128, alpha 256, lr 2e-4) on 665k visual instructions. Rows are packed: one
# caption sample is ~620 tokens with its 576 image tokens, so a 2048-token row holds about three.
LLAVA_STAGES: dict[str, LlavaStage] = {
    "pretrain": LlavaStage(
        "stage 1 (pretrain): the projector alone learns to describe images; language model and vision tower frozen",
        method="full", freeze_llm=True, lr=1e-3,
        data_path="./data/llava_data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
        image_folder="./data/llava_data/LLaVA-Pretrain/images",
        note="# LLaVA-Pretrain (558k image-caption pairs): the JSON and its images/ folder from\n"
             "# huggingface.co/datasets/liuhaotian/LLaVA-Pretrain"),
    "finetune": LlavaStage(
        "stage 2 (finetune): projector + QLoRA adapters on the language model, on visual instructions",
        method="qlora", freeze_llm=False, lr=2e-4, lora_r=128, lora_alpha=256, optimizer="adamw_8bit",
        data_path="./data/llava_data/LLaVA-Instruct-150K/llava_v1_5_mix665k.json",
        image_folder="./data/llava_data/llava_images",
        note="# LLaVA-1.5's instruction mix (665k, huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K), its\n"
             "# images (coco, gqa, ocr_vqa, textvqa, vg) under image_folder as LLaVA's README lays them out"),
}


def llava_configs() -> dict[str, tuple[str, str, str]]:
    """Every built-in LLaVA config name -> (model, tower, stage)."""
    return {f"llava_{m}_{t}_{s}": (m, t, s) for m in LLAVA_MODELS for t in VISION_TOWERS for s in LLAVA_STAGES}


def learning_rate(method: str, dataset: str) -> float:
    return METHODS[method].lr * DATASETS[dataset].lr_scale


def _name(model: str, method: str, dataset: str) -> str:
    return f"{model}_{method}_{dataset}_e{DATASETS[dataset].epochs}"


def builtin_configs() -> dict[str, tuple[str, str, str]]:
    """Every built-in config name -> (model, method, dataset), in table order."""
    return {_name(m, meth, d): (m, meth, d) for m in MODELS for meth in METHODS for d in DATASETS}


def list_configs(pattern: str | None = None) -> list[str]:
    """Built-in config names containing `pattern`, or matching it as a glob (`*qlora*alpaca*`), ignoring case; all of
    them without one."""
    names = list(builtin_configs()) + list(llava_configs())
    if pattern:
        pattern = pattern.lower()
        glob = any(c in pattern for c in "*?[")
        names = [n for n in names if (fnmatch.fnmatchcase(n.lower(), pattern) if glob else pattern in n.lower())]
    return names


def canonical_name(name: str) -> str:
    """The built-in name `name` means: itself, or the one that differs only in case (list-cfg -p ignores case)."""
    names = list_configs()
    return name if name in names else next((n for n in names if n.lower() == name.lower()), name)


def _lookup(name: str) -> tuple[Model, str, Method, str, Dataset]:
    table = builtin_configs()
    if name not in table:
        names = list(table) + list(llava_configs())
        close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.5)
        hint = ("Did you mean: " + ", ".join(close) + "?") if close else f"Models: {', '.join(MODELS)}."
        raise TunelabError(f"unknown config '{name}'. {hint} See them all with `tunelab list-cfg`.")
    model, method, dataset = table[name]
    return MODELS[model], method, METHODS[method], dataset, DATASETS[dataset]


def _next_steps(name: str, file: str, method: str, hub_id: str, objective: str = "sft") -> str:
    ckpt = f"work_dirs/{name}/iter_N"
    if objective == "reward":
        lines = [f"tunelab convert pth_to_hf {file} {ckpt} hf_rm   # the reward model (LoRA: adapter + head)"]
        if method != "full":
            lines.append(f"tunelab convert merge {hub_id} hf_rm rm   # one sequence-classification model")
        lines.append(f"tunelab reward {'hf_rm' if method == 'full' else 'rm'} --data pairs.jsonl   # scores, "
                     f"accuracy")
    elif method == "full":
        lines = [f"tunelab convert pth_to_hf {file} {ckpt} hf_model   # a full Hugging Face model",
                 "tunelab chat hf_model"]
    else:
        lines = [f"tunelab convert pth_to_hf {file} {ckpt} hf_adapter   # the LoRA adapter",
                 f"tunelab convert merge {hub_id} hf_adapter merged   # adapter + base = one model",
                 f"tunelab chat merged   # or, unmerged: tunelab chat {hub_id} --adapter hf_adapter"]
    return "\n".join(f"#   {line}" for line in lines)


def render_config(name: str, file: str | None = None) -> str:
    """The text of the built-in config `name` (what `copy-cfg` writes), its header's commands naming the config as
    `file` (default NAME_copy.py), the name of the file it is written to."""
    name = canonical_name(name)
    file = file or f"{name}_copy.py"
    if name in llava_configs():
        return _render_llava(name, file)
    model, method_name, method, dataset_key, dataset = _lookup(name)
    target_modules = model.lora_target_modules
    what = "fine-tuning" if dataset.objective == "sft" else f"{dataset.objective.upper()} training"
    values = {
        "name": name,
        "file": file,
        "description": f"{method_name} {what} of {model.hub_id} on {dataset.data_path} "
                       f"for {dataset.epochs} epoch{'s' if dataset.epochs > 1 else ''}.",
        "next_steps": _next_steps(name, file, method_name, model.hub_id, dataset.objective),
        "objective": repr(dataset.objective),
        "preference_block": _preference_block(dataset),
        "pretrained_model_name_or_path": repr(model.hub_id),
        "trust_remote_code": repr(model.trust_remote_code),
        "method": repr(method_name),
        "data_note": dataset.note,
        "data_path": repr(dataset.data_path),
        "data_format": repr(dataset.data_format),
        "prompt_template": repr(model.prompt_template),
        "SYSTEM": repr(dataset.system),
        "max_length": repr(dataset.max_length or model.max_length),
        "batch_size": repr(method.batch_size),
        "accumulative_counts": repr(method.accumulative_counts),
        "lr": repr(learning_rate(method_name, dataset_key)),
        "max_epochs": repr(dataset.epochs),
        "evaluation_inputs": repr(list(dataset.evaluation_inputs)),
        "lora_r": repr(method.lora_r),
        "lora_alpha": repr(method.lora_alpha),
        "lora_dropout": repr(method.lora_dropout),
        "lora_target_modules": repr(target_modules if isinstance(target_modules, str) else list(target_modules)),
        "optimizer": repr(method.optimizer),
        "multimodal_block": "",
    }
    # string.Template ($name) leaves the braces of dicts and f-strings in the template alone.
    return string.Template(TEMPLATE_PATH.read_text(encoding="utf-8")).substitute(values)


def _preference_block(dataset: Dataset) -> str:
    """The preference settings of a preference config, one commented line each (empty for supervised ones)."""
    if dataset.objective == "sft":
        return ""
    lines = ["", "# Preference training (docs/PREFERENCE.md)"]
    lines += [f"{key} = {value!r}  # {PREFERENCE_NOTES[key]}" for key, value in dataset.preference]
    return "\n".join(lines) + "\n"


def _render_llava(name: str, file: str) -> str:
    model_name, tower_name, stage_name = llava_configs()[name]
    model, tower, stage = MODELS[model_name], VISION_TOWERS[tower_name], LLAVA_STAGES[stage_name]
    pretrain = f"llava_{model_name}_{tower_name}_pretrain"
    if stage.freeze_llm:
        steps = [f"then stage 2: tunelab copy-cfg llava_{model_name}_{tower_name}_finetune ./ (it starts from this "
                 "run's projector)"]
    else:
        steps = [f"tunelab convert pth_to_hf {file} work_dirs/{name}/iter_N llava_hf   # a HF LLaVA model "
                 "(LoRA merged in)", "tunelab chat llava_hf --image picture.jpg   # or tunelab web / serve llava_hf"]
    multimodal = "\n".join([
        "",
        "# Multimodal (LLaVA, docs/MULTIMODAL.md): the model above becomes the language model, after a vision tower",
        "# and a projector that turns each image into image tokens.",
        f"visual_encoder_name_or_path = {tower.hub_id!r}  # CLIP or SigLIP: hub id or local folder",
        "vision_feature_layer = -2  # the tower's layer that feeds the projector (LLaVA-1.5: the second to last)",
        f"vision_feature_select_strategy = {tower.select_strategy!r}  # 'default' drops CLIP's CLS token; "
        "'full' keeps every token (SigLIP)",
        f"freeze_llm = {stage.freeze_llm!r}  # True: train the projector alone (stage 1)",
        f"pretrained_pth = {None if stage.freeze_llm else f'./work_dirs/{pretrain}'!r}  # stage 2: stage 1's "
        "work dir (its projector)",
        "visual_encoder_lora = False  # True: LoRA on the vision tower too (lora / qlora)",
        f"image_folder = {stage.image_folder!r}  # where the image paths in the data start",
        "image_pad_to_square = True  # pad images to squares before the tower's resize and crop (LLaVA-1.5)",
        "evaluation_images = None  # the picture evaluation_inputs ask about (a path, or one per question); "
        "None: asked without one",
    ]) + "\n"
    values = {
        "name": name, "file": file, "description": f"{stage.description}. Language model {model.hub_id}, vision "
                                                  f"tower {tower.hub_id}.",
        "next_steps": "\n".join(f"#   {line}" for line in steps),
        "pretrained_model_name_or_path": repr(model.hub_id), "trust_remote_code": repr(model.trust_remote_code),
        "method": repr(stage.method), "data_note": stage.note, "data_path": repr(stage.data_path),
        "data_format": repr("auto"), "prompt_template": repr(model.prompt_template), "SYSTEM": repr(""),
        "max_length": repr(2048), "batch_size": repr(stage.batch_size),
        "accumulative_counts": repr(stage.accumulative_counts), "lr": repr(stage.lr), "max_epochs": repr(1),
        "evaluation_inputs": repr(list(stage.evaluation_inputs)), "lora_r": repr(stage.lora_r),
        "lora_alpha": repr(stage.lora_alpha), "lora_dropout": repr(0.05), "lora_target_modules": repr("all-linear"),
        "optimizer": repr(stage.optimizer), "objective": repr("sft"), "preference_block": "",
        "multimodal_block": multimodal,
    }
    return string.Template(TEMPLATE_PATH.read_text(encoding="utf-8")).substitute(values)


def copy_config(name: str, dest_dir: str | Path, force: bool = False) -> Path:
    """Write the built-in config `name` to DEST_DIR/NAME_copy.py; never overwrite unless `force`. A DEST_DIR ending in
    .py that is not a folder is the file to write."""
    name = canonical_name(name)
    if name not in list_configs():
        _lookup(name)  # the unknown name's error, with the closest names, before any path is looked at
    dest_dir = Path(dest_dir)
    if dest_dir.suffix == ".py" and not dest_dir.is_dir():
        dest = dest_dir  # `copy-cfg NAME my_config.py`: the file, not a folder named my_config.py
    else:
        dest = dest_dir / f"{name}_copy.py"
        if dest_dir.is_symlink() and not dest_dir.exists():
            raise TunelabError(f"{dest_dir} is a symbolic link to {os.readlink(dest_dir)}, which does not exist. "
                               f"Give a folder to copy into, e.g. ./")
        if dest_dir.exists() and not dest_dir.is_dir():
            raise TunelabError(f"{dest_dir} is a file, not a folder. Give a folder to copy into, e.g. ./")
    if dest.is_dir():
        raise TunelabError(f"{dest} is a folder; not writing over it. Move it away, or copy into another folder.")
    if dest.exists() and not force:
        raise TunelabError(f"{dest} already exists; not overwriting your edits. "
                           f"Pass --force to replace it, or copy into another folder.")
    text = render_config(name, dest.name)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
    except OSError as exc:  # a read-only folder, a file where a folder should be (afile/sub), ...
        raise TunelabError(f"cannot write {dest}: {exc.strerror or exc}"
                           + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(dest) else "")
                           + ". Give a folder you can write to, e.g. ./") from None
    return dest
