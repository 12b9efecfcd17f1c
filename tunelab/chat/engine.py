"""The model behind `tunelab chat`, `tunelab web` and `tunelab serve`: loaded once, with the template it was trained with.

`load_chat_model` accepts what a user has after training: a HF model (hub id or directory), optionally a LoRA adapter
(an adapter dir, an iter_N checkpoint or a WORK_DIR), or a checkpoint alone (its tunelab.json names the base).
The template comes from `--prompt-template`, else the adapter's / model's tunelab.json, else a guess from the model.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError
from tunelab.export.adapters import ADAPTER_CONFIG, check_adapter_fits, find_adapter_dir
from tunelab.train.layout import MODEL_DIR, is_checkpoint, looks_like_work_dir, read_meta, resolve_checkpoint


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    template: object
    system: str = ""
    name: str = "tunelab"
    template_source: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """One generation at a time: the server's requests queue behind it."""

    def with_system(self, messages: list[dict], system: str | None = None) -> list[dict]:
        """`messages` with the session's system prompt first, unless they bring their own."""
        if messages and messages[0].get("role") == "system":
            return list(messages)
        system = self.system if system is None else system
        return ([{"role": "system", "content": system}] if system else []) + list(messages)

    def reply(self, messages: list[dict], settings, *, stop_words=(), on_text: Callable[[str], None] | None = None):
        from tunelab.model.generate import generate_reply

        with self.lock:
            return generate_reply(self.model, self.tokenizer, self.template, self.with_system(messages), settings,
                                  stop_words=tuple(stop_words), on_text=on_text)


def _resolve_paths(model_path: str, adapter: str | None) -> tuple[str, Path | None, dict | None]:
    """(base model, adapter dir or None, metadata) for the paths a user typed."""
    meta = None
    p = Path(model_path)
    if p.is_dir() and not (p / "config.json").is_file() and (
            is_checkpoint(p) or looks_like_work_dir(p) or (p / ADAPTER_CONFIG).is_file()):
        # a checkpoint or an adapter passed as MODEL: its tunelab.json names the base model
        if (p / ADAPTER_CONFIG).is_file():
            adapter_dir, meta_dir = p, p
        else:
            ckpt = resolve_checkpoint(p)
            if not (ckpt / MODEL_DIR / ADAPTER_CONFIG).is_file():
                return str(ckpt / MODEL_DIR), None, read_meta(ckpt)
            adapter_dir, meta_dir = ckpt / MODEL_DIR, ckpt
        if adapter:
            raise TunelabError(f"{model_path} is already an adapter / checkpoint: pass the base model as MODEL "
                               f"and this as --adapter.")
        meta = read_meta(meta_dir) or {}
        base = meta.get("base_model")
        if not base:
            raise TunelabError(f"{meta_dir} has no tunelab.json naming its base model: run "
                               f"`tunelab chat BASE_MODEL --adapter {model_path}`.")
        return base, adapter_dir, meta
    adapter_dir = None
    if adapter:
        adapter_dir, meta_dir = find_adapter_dir(adapter)
        meta = read_meta(meta_dir) or read_meta(adapter_dir)
    if meta is None and p.is_dir():
        meta = read_meta(p)
    return model_path, adapter_dir, meta


def choose_template(prompt_template: str | None, meta: dict | None, model_path: str, tokenizer):
    """(template, where it came from): the flag, then tunelab.json, then a guess from the model, then 'default'."""
    from tunelab.data import templates

    if prompt_template:
        return templates.get_template(prompt_template, tokenizer), "--prompt-template"
    if meta and meta.get("prompt_template"):
        return templates.get_template(meta["prompt_template"], tokenizer), "tunelab.json"
    try:
        guessed = templates.guess_template(model_path)
    except (OSError, ValueError):  # an unreadable config.json: fall through to the tokenizer's own template
        guessed = None
    if guessed:
        return templates.get_template(guessed, tokenizer), f"guessed from {model_path}"
    if getattr(tokenizer, "chat_template", None):
        return templates.get_template("hf", tokenizer), "the tokenizer's chat_template"
    return templates.get_template("default", tokenizer), \
        "fallback (no tunelab.json, no guess; pass --prompt-template to choose)"


def check_bits(bits: int | None) -> None:
    if not bits:
        return
    if bits not in (4, 8):
        raise TunelabError(f"--bits {bits}: use 4 or 8 (or leave it out to load the model unquantised).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError("--bits needs bitsandbytes: pip install 'tunelab[quant]' (or leave --bits out).") from None
    import torch

    if not torch.cuda.is_available():
        _say(f"note: no CUDA GPU; loading the model in {bits}-bit on the CPU with bitsandbytes (slow). "
             f"Leave --bits out to load it unquantised.")


def load_chat_model(model_path: str, *, adapter: str | None = None, prompt_template: str | None = None,
                    system: str | None = None, bits: int | None = None, device: str = "auto", dtype: str = "auto",
                    trust_remote_code: bool = False) -> ChatModel:
    """Load the model (and adapter) once; pick the template and system prompt it was trained with."""
    from tunelab.model.load import load_model_for_inference, load_tokenizer

    from tunelab.export.convert import pick_device

    base, adapter_dir, meta = _resolve_paths(model_path, adapter)
    pick_device(device)  # a clear message for --device cuda on a machine without one
    check_bits(bits)
    _say(f"loading {base}" + (f" with adapter {adapter_dir}" if adapter_dir else "") + (f" in {bits}-bit" if bits else ""))
    try:
        model, tokenizer = load_model_for_inference(base, bits=bits, device=device, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise TunelabError(f"cannot load the model {base!r}: {exc}") from None
    if adapter_dir is not None:
        from peft import PeftModel

        check_adapter_fits(model, adapter_dir, base)
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        model.eval()
        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(str(adapter_dir), trust_remote_code=trust_remote_code)
    template, source = choose_template(prompt_template, meta, base, tokenizer)
    _say(f"prompt template: {template.name} ({source})")
    if system is None:
        system = (meta or {}).get("system") or ""
    name = Path(str(adapter_dir)).name if adapter_dir else Path(base).name or base
    return ChatModel(model=model, tokenizer=tokenizer, template=template, system=system, name=name,
                     template_source=source)


def add_model_arguments(parser) -> None:
    """The loading flags shared by chat, web and serve."""
    parser.add_argument("model", metavar="MODEL",
                        help="HF model (hub id or directory), a merged model, or a checkpoint (iter_N / WORK_DIR)")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter: an adapter dir, an iter_N or a WORK_DIR")
    parser.add_argument("--prompt-template", metavar="NAME",
                        help="chat template (default: from tunelab.json, else guessed from the model)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt (default: the one used in training)")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="load the base quantised with bitsandbytes")
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own code (only for repos you trust)")


def add_sampling_arguments(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.75)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop-word", action="append", default=[], metavar="TEXT",
                        help="extra stop word (repeatable); the template's own stop words always apply")


def settings_from_args(args):
    from tunelab.model.generate import GenerationSettings

    # The same ranges the server accepts (ChatRequest); outside them transformers fails mid-reply with a traceback.
    for flag, value, ok, rule in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
                                  ("--temperature", args.temperature, args.temperature >= 0, "0 (greedy) or more"),
                                  ("--top-k", args.top_k, args.top_k >= 0, "0 or more"),
                                  ("--top-p", args.top_p, 0 < args.top_p <= 1, "above 0 and at most 1"),
                                  ("--repetition-penalty", args.repetition_penalty, args.repetition_penalty > 0,
                                   "above 0 (1.0 = off)")):
        if not ok:
            raise TunelabError(f"{flag} {value}: must be {rule}.")
    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_from_args(args) -> ChatModel:
    return load_chat_model(args.model, adapter=args.adapter, prompt_template=args.prompt_template,
                           system=args.system, bits=args.bits, device=args.device, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code)
