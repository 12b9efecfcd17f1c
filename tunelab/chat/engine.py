"""The model behind `tunelab chat`, `tunelab web` and `tunelab serve`: loaded once, with the template it was trained with.

`load_chat_model` accepts what a user has after training: a HF model (hub id or directory), optionally a LoRA adapter
(an adapter dir, an iter_N checkpoint or a WORK_DIR), or a checkpoint alone (its tunelab.json names the base).
The template comes from `--prompt-template`, else the adapter's / model's tunelab.json, else a guess from the model.
A LLaVA model (a HF LLaVA folder or a LLaVA run's checkpoint) also reads images (`tunelab.chat.vision`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunelab.data.messages import with_default_system
from tunelab.errors import TunelabError
from tunelab.export.adapters import ModelToLoad, apply_adapter, check_adapter_runs_on, model_to_load


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
    max_model_len: int = 2048
    """Prompt + reply tokens one request may use: the model's context, or --max-model-len."""
    max_batch_size: int = 1
    """Requests decoded together (continuous batching); 1 answers them one at a time."""
    vision: object = None
    """A LLaVA model's image processor and image tokens (`tunelab.chat.vision.Vision`); None: text only."""
    _batcher: object = field(default=None, repr=False)
    _start_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _grammars: object = field(default=None, repr=False)
    _grammar_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def batcher(self):
        """The generation worker, started on first use; chat, web and serve all go through it."""
        from tunelab.chat.batcher import Batcher

        with self._start_lock:
            if self._batcher is None:
                self._batcher = Batcher(self.model, self.tokenizer, max_batch_size=self.max_batch_size)
            return self._batcher

    @property
    def grammars(self):
        """The xgrammar compiler of this model's tokenizer (`tunelab.chat.grammar.Grammars`), made on the first request
        that needs one (a `response_format`, a forced call) and kept: requests compile their grammars with it."""
        from tunelab.chat.grammar import Grammars

        with self._grammar_lock:  # not _start_lock: the event loop takes that one for every request
            if self._grammars is None:
                self._grammars = Grammars.for_model(self)
            return self._grammars

    def close(self) -> None:
        """End the generation worker, if one was started. A command calls this before it returns: a daemon worker
        still inside a torch op when Python exits aborts the process ("terminate called without an active
        exception")."""
        if self._batcher is not None:
            self._batcher.stop()

    @functools.cached_property
    def reasoning(self):
        """How the template writes a reply's reasoning (`tunelab.data.templates.ReasoningFormat`: Qwen3's and
        DeepSeek-R1's <think>...</think>), learnt once by rendering; None where it writes none."""
        from tunelab.data.templates import reasoning_format

        return reasoning_format(self.template)

    def with_system(self, messages: list[dict], system: str | None = None) -> list[dict]:
        """`messages` with the session's system prompt first, unless they bring their own."""
        out = list(messages)
        with_default_system(out, self.system if system is None else system)
        return out

    def encode(self, messages: list[dict], tools: list[dict] | None = None, reply_start: str = "") -> list[int]:
        """The prompt's token ids: the conversation (with the system prompt and any tools) rendered by the template,
        and any `reply_start` after it."""
        return self.template.prompt_ids(self.tokenizer, self.with_system(messages), tools=tools,
                                        reply_start=reply_start)

    def prompt(self, messages: list[dict], *, files: bool = False, tools: list[dict] | None = None,
               reply_start: str = ""):
        """(token ids, pixel values or None) of messages whose content may be OpenAI content parts, images among
        them for a LLaVA model. `files`: image parts may name files on this machine (the terminal, not the server).
        `reply_start`: text the reply starts with, written after the generation prompt for the model to go on with
        (a tool call's start)."""
        from tunelab.chat.vision import split_images, text_only

        if self.vision is None:
            text_only(messages)
        places: list[str] | None = [] if self.vision is not None else None  # where each picture is, for its errors
        messages, refs = split_images(messages, files=files, places=places)
        ids = self.encode(messages, tools, reply_start)
        if self.vision is None:
            return ids, None
        if ids.count(self.vision.token_id) != len(refs):
            raise TunelabError(f"the prompt holds {ids.count(self.vision.token_id)} <image> placeholders for "
                               f"{len(refs)} images: send each image as an image part, and no <image> text.")
        return self.vision.expand(ids), self.vision.pixel_values(refs, places)

    def fit_reply(self, prompt_tokens: int, max_new_tokens: int, *, asked: bool = True,
                  prompt_field: str = "messages") -> int:
        """max_new_tokens within the context: cut down when it was a default, `ContextError` when it was `asked` for.
        `prompt_field`: the request field the prompt came from ("messages" or /v1/completions' "prompt")."""
        room = self.max_model_len - prompt_tokens
        whole, shorter = ("the messages alone take", "the conversation") if prompt_field == "messages" else \
            (f"the {prompt_field} alone takes", f"the {prompt_field}")
        if room < 1:  # no max_tokens helps: only a shorter conversation does
            raise ContextError(
                f"This model's maximum context length is {self.max_model_len} tokens, but {whole} "
                f"{prompt_tokens}, which leaves no room for a reply: shorten {shorter}.", prompt_field)
        if asked and max_new_tokens > room:
            raise ContextError(
                f"This model's maximum context length is {self.max_model_len} tokens, but "
                f"{prompt_tokens + max_new_tokens} were asked for ({prompt_tokens} in the {prompt_field}, "
                f"{max_new_tokens} in the completion): lower max_tokens to {room} or less, or shorten the "
                f"{prompt_field}.", "max_tokens")
        return min(max_new_tokens, room)

    def job(self, prompt_ids: list[int], settings, *, stop_words=(), ignore_eos: bool = False, on_text=None,
            on_done=None, pixel_values=None, logprobs: int | None = None, prompt_logprobs: bool = False,
            constraint=None):
        """A batcher job with this model's stop rules: EOS tokens and the template's stop words, unless `ignore_eos`
        (then only the caller's `stop_words` end the reply; benchmarks use it for replies of a fixed length).
        `logprobs`, `prompt_logprobs`: see `Job`. With a `constraint` (a grammar,
        `tunelab.chat.grammar.reply_constraint`) the grammar ends the reply, at an EOS token or a stop word of one
        token once it is complete, and the caller's `stop_words` alone are looked for in the text: the template's
        spelt out inside a JSON string are text."""
        from tunelab.chat.jobs import Job
        from tunelab.model.generate import stop_words_for

        if ignore_eos or constraint is not None:
            stops, eos = tuple(stop_words), ()
        else:
            stops, eos = stop_words_for(self.template, self.tokenizer, stop_words), eos_token_ids(self)
        return Job(prompt_ids, settings, stop_words=stops, eos_ids=eos, on_text=on_text, on_done=on_done,
                   pixel_values=pixel_values, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                   constraint=constraint)

    def reply(self, messages: list[dict], settings, *, stop_words=(), on_text: Callable[[str], None] | None = None,
              files: bool = False):
        """The reply to `messages` (blocking; `on_text` gets it piece by piece). `files`: see `prompt`."""
        import queue

        prompt_ids, pixel_values = self.prompt(messages, files=files)
        settings = dataclasses.replace(settings, max_new_tokens=self.fit_reply(
            len(prompt_ids), settings.max_new_tokens, asked=False))
        done: queue.Queue = queue.Queue()
        job = self.job(prompt_ids, settings, stop_words=stop_words, on_text=on_text, on_done=done.put,
                       pixel_values=pixel_values)
        self.batcher.submit(job)
        try:
            result = done.get()
        finally:
            job.cancel()  # Ctrl-C while it generates: the worker drops it at its next step
        if isinstance(result, Exception):
            raise result
        return result.text.strip() if not on_text else result.text


class ContextError(TunelabError):
    """A request that does not fit the model's context; `param` is the request field to change."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def eos_token_ids(chat: ChatModel) -> tuple[int, ...]:
    """The token ids that end a reply, as `generate` uses them: generation_config's eos_token_id and the tokenizer's."""
    configured = getattr(getattr(chat.model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return tuple(i for i in dict.fromkeys([*ids, chat.tokenizer.eos_token_id]) if i is not None)


def context_length(model, meta: dict | None) -> tuple[int, str]:
    """(tokens, where from): the model config's max_position_embeddings, else the training max_length."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "max_position_embeddings", None):
        return int(config.max_position_embeddings), "config.json max_position_embeddings"
    if meta and meta.get("max_length"):
        return int(meta["max_length"]), "tunelab.json max_length"
    return 2048, "default (pass --max-model-len)"


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
                    trust_remote_code: bool = False, max_model_len: int | None = None,
                    max_batch_size: int = 1, allow_other_base: bool = False,
                    to_load: ModelToLoad | None = None) -> ChatModel:
    """Load the model (and adapter) once; pick the template and system prompt it was trained with.

    `max_model_len` (default: the model's context) bounds prompt + reply tokens of a request; `max_batch_size`
    is how many requests the engine decodes together. `to_load`: what `model_to_load` made of `model_path` and
    `adapter` already (a checkpoint's checksums checked), so a multi-GB checkpoint is not read twice to check it."""
    from tunelab.chat.vision import reads_images
    from tunelab.model.load import load_model_for_inference, pick_device
    from tunelab.model.tokenizer import load_tokenizer

    to_load = to_load or model_to_load(model_path, adapter)
    base, adapter_dir, meta = to_load.base, to_load.adapter_dir, to_load.meta
    if meta.get("objective") == "reward":
        raise TunelabError(f"{adapter or model_path} is a reward model: it scores replies and does not write them. "
                           f"Score with `tunelab reward {model_path}{f' --adapter {adapter}' if adapter else ''} "
                           f"--data FILE`.")
    dev = pick_device(device)  # a clear message for --device cuda on a machine without one
    check_bits(bits)
    check_adapter_runs_on(adapter_dir, bits, dev)
    _say(f"loading {base}" + (f" with adapter {adapter_dir}" if adapter_dir else "") + (f" in {bits}-bit" if bits else ""))
    vision = None
    if reads_images(base, meta):
        from tunelab.chat.vision import load_llava_chat
        from tunelab.model.llava import is_llava_dir

        exported = is_llava_dir(base) and (Path(base) / "processor_config.json").is_file()
        model_dir = None if exported else (adapter_dir or Path(base))  # a LLaVA run's checkpoint
        model, tokenizer, vision = load_llava_chat(base, meta, model_dir, device=dev, dtype=dtype, bits=bits)
        adapter_dir = None
    else:
        try:
            model, tokenizer = load_model_for_inference(base, bits=bits, device=dev, dtype=dtype,
                                                        trust_remote_code=trust_remote_code,
                                                        rope=meta.get("rope_scaling"))
        except OSError as exc:
            raise TunelabError(f"cannot load the model {base!r}: {exc}") from None
    if adapter_dir is not None:
        model = apply_adapter(model, adapter_dir, base, meta=meta, allow_other_base=allow_other_base, say=_say)
        model.eval()
        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(str(adapter_dir), trust_remote_code=trust_remote_code)
    from tunelab.data.templates import choose_template

    template, source = choose_template(prompt_template, meta, base, tokenizer)
    _say(f"prompt template: {template.name} ({source})")
    if system is None:
        system = meta.get("system") or ""
    name = Path(str(adapter_dir)).name if adapter_dir else Path(base).name or base
    context, where = context_length(model, meta)
    if max_model_len is None:
        max_model_len = context
        _say(f"context: {max_model_len} tokens ({where})")
    elif max_model_len > context and where.startswith("config.json"):
        _say(f"warning: --max-model-len {max_model_len} is above the model's context of {context} tokens ({where}): "
             f"positions past {context} were never trained, so replies that reach them may be nonsense.")
    return ChatModel(model=model, tokenizer=tokenizer, template=template, system=system, name=name,
                     template_source=source, max_model_len=max_model_len, max_batch_size=max_batch_size,
                     vision=vision)


def add_model_arguments(parser) -> None:
    """The loading flags shared by chat, web, serve, predict and eval (--prompt-template also as --template, the
    spelling of LLaMA-Factory and of check-dataset)."""
    parser.add_argument("model", metavar="MODEL",
                        help="HF model (hub id or directory), a merged model, or a checkpoint (iter_N / WORK_DIR)")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter: an adapter dir, an iter_N or a WORK_DIR")
    parser.add_argument("--prompt-template", "--template", metavar="NAME",
                        dest="prompt_template",
                        help="chat template (default: from tunelab.json, else guessed from the model)")
    from tunelab.config.xtuner_runtime import SYSTEM_TEMPLATES

    system = parser.add_mutually_exclusive_group()
    system.add_argument("--system", metavar="TEXT", help="system prompt (default: the one used in training)")
    system.add_argument("--system-template", metavar="NAME", dest="system", type=_xtuner_system_template,
                        help=f"XTuner's SYSTEM_TEMPLATE.NAME as the system prompt: {', '.join(SYSTEM_TEMPLATES)}")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="load the base quantised with bitsandbytes")
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own code (only for repos you trust)")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="use --adapter although it was trained on a base of another architecture")


def _xtuner_system_template(name: str) -> str:
    """The text of XTuner's SYSTEM_TEMPLATE.`name`: `xtuner chat --system-template alpaca` reads the same here."""
    import argparse

    from tunelab.config.xtuner_runtime import SYSTEM_TEMPLATES

    if name not in SYSTEM_TEMPLATES:
        raise argparse.ArgumentTypeError(f"unknown XTuner system template {name!r}; known: "
                                         f"{', '.join(map(repr, SYSTEM_TEMPLATES))} (or give the text: --system TEXT)")
    return SYSTEM_TEMPLATES[name]


DEFAULT_MAX_NEW_TOKENS = 512


def add_sampling_arguments(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.75)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop-word", action="append", default=[], metavar="TEXT",
                        help="extra stop word (repeatable); the template's own stop words always apply")


def settings_from_args(args):
    from tunelab.model.generate import GenerationSettings, check_settings

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    # the ranges the server checks requests against; outside them transformers would fail mid-reply
    check_settings(settings, {f: "--" + f.replace("_", "-") for f in dataclasses.asdict(settings)})
    return settings


def stop_words_from_args(args) -> tuple[str, ...]:
    """The --stop-word values. An empty one is refused, as a request's empty `stop` is: it is in every text, so every
    reply would end before its first word."""
    from tunelab.model.generate import SettingError

    for word in args.stop_word:
        if not word:
            raise SettingError("--stop-word", "--stop-word '': must be a non-empty text (an empty stop word would end "
                                              "every reply at once).")
    return tuple(args.stop_word)


def load_from_args(args, *, max_batch_size: int = 1, to_load: ModelToLoad | None = None) -> ChatModel:
    """The model `add_model_arguments`' flags name, for chat, web, serve, predict and eval; web and serve add
    --max-model-len (`max_batch_size`: web and serve's --max-batch-size or its default, predict's --batch-size;
    `to_load`: as load_chat_model takes it)."""
    return load_chat_model(args.model, adapter=args.adapter, prompt_template=args.prompt_template,
                           system=args.system, bits=args.bits, device=args.device, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code, max_model_len=getattr(args, "max_model_len", None),
                           max_batch_size=max_batch_size,
                           allow_other_base=args.allow_other_base, to_load=to_load)
