"""`tunelab serve MODEL --engine vllm`: vLLM's OpenAI-compatible server for a merged model, with its tunelab template.

vLLM (paged attention, CUDA graphs) serves many users faster than tunelab's own engine; this only starts it the way
`tunelab serve` would: on 127.0.0.1 unless told otherwise, prompted with the template `tunelab chat` would use
(`templates.choose_template`: the one the model was trained with, which `convert merge` also writes into the
tokenizer), the API key passed in the environment (VLLM_API_KEY) so it does not show in the process list. Where
that template writes tool calls or reasoning in a format one of vLLM's parsers reads, and the tokenizer has the markers
that parser looks up, vLLM is told to use it (`--tool-call-parser`, `--reasoning-parser`), so its replies carry
`tool_calls` and the reasoning as tunelab's own server gives them (the reasoning under the installed vLLM's name for
it: only `reasoning` in releases since early 2026, where tunelab's server sends `reasoning_content` too). The sampling
flags become vLLM's default sampling values (`--override-generation-config`), --max-batch-size its --max-num-seqs,
--device cuda:N the GPU it sees (`gpu_env`); the flags its server has no place for are refused, never dropped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

from tunelab.errors import TunelabError

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOOL_CALL_PARSERS = {
    "qwen2_5_chat": "hermes", "qwen3_chat": "hermes", "qwen3_nothink_chat": "hermes",  # <tool_call>{json}</tool_call>
    "llama3_1_chat": "llama3_json", "llama3_2_chat": "llama3_json",  # {"name", "parameters"}
    "mistral_v3": "mistral", "mistral_tekken": "mistral",  # [TOOL_CALLS][...]
    "internlm2_chat": "internlm", "internlm2_5_chat": "internlm", "internlm3_chat": "internlm",  # <|action_start|>
}
"""The vLLM tool-call parser that reads the calls each template writes. glm4_chat ('name\\n{json}') and phi4_mini
(<|tool_call|>[...]) write formats no vLLM parser reads: their calls come back as text."""


PARSER_TOKENS = {"hermes": ("<tool_call>", "</tool_call>"), "mistral": ("[TOOL_CALLS]",),
                 "qwen3": ("<think>", "</think>"), "deepseek_r1": ("<think>", "</think>")}
"""The markers each vLLM parser looks up in the tokenizer's vocabulary. Where one is not a token there (a model trained
with another family's template, e.g. qwen3_chat on Qwen2.5 or Llama, writes '<think>' as plain text), the parser
raises at every request it is made for, so the model would answer nothing: it is left out."""


def parser_flags(template, vocab) -> tuple[list[str], list[str]]:
    """(vLLM's flags that read the tool calls and the reasoning `template` writes out of its replies, a note for each
    parser left out because `vocab`, the tokenizer's tokens, lacks a marker it looks up)."""
    from tunelab.data.templates import reasoning_format

    wanted = []
    if template.name in TOOL_CALL_PARSERS:
        wanted.append(("--tool-call-parser", TOOL_CALL_PARSERS[template.name], "tool calls"))
    reasoning = reasoning_format(template)
    if reasoning is not None and (reasoning.open, reasoning.close) == ("<think>", "</think>"):
        # DeepSeek-R1's prompt opens the block, so its replies start inside it; Qwen3's replies open it themselves
        wanted.append(("--reasoning-parser", "deepseek_r1" if reasoning.opened else "qwen3", "reasoning"))
    flags, notes = [], []
    for flag, parser, what in wanted:
        missing = [token for token in PARSER_TOKENS.get(parser, ()) if token not in vocab]
        if missing:
            notes.append(f"note: template {template.name!r} writes {what} in the form vLLM's {parser} parser reads, "
                         f"but the tokenizer has no {' or '.join(missing)} token, without which that parser fails "
                         f"every request: vLLM starts without it, and its replies carry the {what} as text.")
            continue
        flags += (["--enable-auto-tool-choice"] if flag == "--tool-call-parser" else []) + [flag, parser]
    return flags, notes


def generation_config(args) -> dict:
    """The sampling flags as vLLM's --override-generation-config: the default temperature, top_p, top_k and
    repetition_penalty of every request that leaves them out (tunelab's defaults too, so vLLM samples as tunelab's
    own server would, not by the model's generation_config.json), and --max-tokens-limit as max_new_tokens, which
    vLLM makes the most a reply may take. Raises TunelabError, before vLLM starts, for a flag vLLM has no place for."""
    from tunelab.chat.engine import DEFAULT_MAX_NEW_TOKENS, settings_from_args, stop_words_from_args

    settings = settings_from_args(args)  # the ranges tunelab's own server checks
    if stop_words_from_args(args):
        raise TunelabError("--stop-word: vLLM takes no stop words of its own: send them as each request's `stop`, or "
                           "leave --engine vllm out.")
    if settings.seed is not None:  # vLLM's --seed seeds the engine once; tunelab's is each request's own seed
        raise TunelabError("--seed: vLLM takes no seed for requests: send `seed` in each request, or leave --engine "
                           "vllm out.")
    if settings.max_new_tokens != DEFAULT_MAX_NEW_TOKENS:
        # its max_new_tokens is both the length of a reply not asked for and the cap: --max-tokens-limit gives it
        raise TunelabError("--max-new-tokens: vLLM has no reply length of its own for requests without max_tokens "
                           "(they get up to --max-tokens-limit): use --max-tokens-limit, or leave --engine vllm out.")
    return {"temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": settings.top_k if settings.top_k > 0 else -1,  # off: -1, which every vLLM version reads so
            "repetition_penalty": settings.repetition_penalty, "max_new_tokens": args.max_tokens_limit}


def gpu_env(device: str) -> dict[str, str]:
    """--device as vLLM takes it, as environment variables. vLLM has no device flag (deprecated in 0.9, removed in
    0.10): it runs on what its build is for (pip's: CUDA GPUs), on the GPUs CUDA_VISIBLE_DEVICES shows it. So cuda:N
    becomes that variable, N counted as torch counts (among the GPUs visible already, as tunelab's own engine would
    take it); cpu, which takes another build of vLLM and no flag, is refused rather than ignored."""
    if device in ("auto", "cuda"):
        return {}
    from tunelab.model.load import check_device

    dev = check_device(device)  # a name that is no device, or a GPU this machine lacks: refused here
    if dev.type != "cuda":
        raise TunelabError(f"--device {device}: vLLM takes no device: it runs where its build does (pip install vllm: "
                           f"CUDA GPUs; a CPU build needs no flag). Use --device cuda:N, or leave --engine vllm out to "
                           f"serve on the {dev.type.upper()} with tunelab's engine.")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"CUDA_VISIBLE_DEVICES": visible.split(",")[dev.index].strip() if visible else str(dev.index)}


def vllm_command(model: str, *, host: str, port: int, served_name: str, template_file: str | None = None,
                 max_model_len: int | None = None, max_num_seqs: int | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, parsers: list[str] = (), sampling: dict | None = None,
                 python: str = sys.executable) -> list[str]:
    """The command line that starts vLLM's OpenAI server (`vllm serve` is the same entry point)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", served_name,
           "--host", host, "--port", str(port)]
    if sampling:
        cmd += ["--override-generation-config", json.dumps(sampling)]
    if template_file:
        cmd += ["--chat-template", template_file]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if max_num_seqs:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    if dtype != "auto":
        cmd += ["--dtype", VLLM_DTYPES[dtype]]
    if trust_remote_code:
        cmd += ["--trust-remote-code"]
    return cmd + list(parsers)


def write_template(model: str, *, prompt_template: str | None, system: str | None,
                   trust_remote_code: bool = False) -> tuple[str | None, str, object, object]:
    """(a .jinja file holding the template `tunelab chat` would prompt the model with, or None where that is the
    tokenizer's own; what was chosen; the template; the tokenizer)."""
    from tunelab.data.templates import choose_template, template_with_default_system
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.train.layout import read_meta

    meta = dict(read_meta(Path(model)) or {}) if Path(model).is_dir() else {}
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    template, source = choose_template(prompt_template, meta, model, tokenizer)
    if template.name == "hf":
        return None, f"the tokenizer's own chat_template ({source})", template, tokenizer
    template = template_with_default_system(template, meta.get("system") if system is None else system)
    fd, path = tempfile.mkstemp(prefix="tunelab-template-", suffix=".jinja")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(template.to_jinja())
    return path, f"{template.name} → {path}", template, tokenizer


def check_servable(args) -> None:
    """vLLM is installed, and MODEL is a whole model (not a LoRA adapter or a training checkpoint)."""
    if importlib.util.find_spec("vllm") is None:
        raise TunelabError("--engine vllm needs vLLM on a CUDA machine: pip install vllm "
                           "(or leave --engine out to use tunelab's own server).")
    if args.adapter or args.bits:
        flag = "--adapter" if args.adapter else "--bits"
        raise TunelabError(f"--engine vllm serves a merged model, without {flag}: run `tunelab convert merge BASE "
                           f"ADAPTER merged`, then `tunelab serve merged --engine vllm`.")
    path = Path(args.model)
    if path.is_dir() and not (path / "config.json").is_file():
        raise TunelabError(f"{args.model} has no config.json (an adapter or checkpoint?): --engine vllm serves a merged "
                           f"model; run `tunelab convert merge BASE {args.model} merged` first.")


def run_vllm(args) -> int:
    """Replace this process with vLLM's server (signals and Ctrl-C then reach vLLM directly)."""
    check_servable(args)
    sampling = generation_config(args)
    gpu = gpu_env(args.device)
    template_file, chosen, template, tokenizer = write_template(
        args.model, prompt_template=args.prompt_template, system=args.system, trust_remote_code=args.trust_remote_code)
    parsers, notes = parser_flags(template, tokenizer.get_vocab())
    cmd = vllm_command(args.model, host=args.host, port=args.port, served_name=Path(args.model).name or args.model,
                       template_file=template_file, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_batch_size, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                       parsers=parsers, sampling=sampling)
    env = {**os.environ, **gpu}
    if args.api_key:
        env["VLLM_API_KEY"] = args.api_key
    print(f"prompt template: {chosen}", file=sys.stderr, flush=True)
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    print("starting vLLM: " + " ".join([*(f"{k}={v}" for k, v in gpu.items()), *cmd]), file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached
