"""`tunelab chat`, `tunelab web`, `tunelab serve`: talk to a model in the terminal, the browser, or over HTTP."""

from __future__ import annotations

import argparse
import sys

CHAT_DESCRIPTION = """\
Chat with a model in the terminal: replies stream as they are generated, the conversation is kept.
End a question with an empty line; RESET clears the history, EXIT quits.
With --prompt, or questions piped on stdin (one per line), only the replies are printed (for scripts).
The prompt template comes from --prompt-template, else tunelab.json of the adapter / model, else a guess.

example:
  tunelab chat merged
  tunelab chat internlm/internlm2-chat-1_8b --adapter hf_adapter
  tunelab chat Qwen/Qwen2.5-0.5B-Instruct --adapter work_dirs/run1 --bits 4
  tunelab chat merged --prompt "Who are you?"
  tunelab chat llava_hf --image cat.jpg --prompt "What is in the picture?"   # a LLaVA model
  printf 'Who are you?\\nWhat can you do?\\n' | tunelab chat merged
"""

WEB_DESCRIPTION = """\
A chat page in the browser (sampling settings, system prompt, clear history), served on 127.0.0.1 by default.
The page talks to the same OpenAI-compatible API as `tunelab serve` (also available while it runs).
With --api-key the page asks for the key once and keeps it for the browser tab.

example:
  tunelab web merged
  tunelab web internlm/internlm2-chat-1_8b --adapter hf_adapter --port 7860
  tunelab web merged --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
"""

SERVE_DESCRIPTION = """\
An OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions (stream or not), on 127.0.0.1 by default.
Concurrent requests are decoded together (continuous batching, up to --max-batch-size at once); prompt + max_tokens
must fit --max-model-len (default: the model's context). --engine vllm starts vLLM instead, for a merged model.

example:
  tunelab serve merged --port 8000
  tunelab serve merged --api-key KEY --max-batch-size 32
  tunelab serve merged --engine vllm
  python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x'); \\
print(c.chat.completions.create(model='merged', messages=[{'role': 'user', 'content': 'Hi'}]).choices[0].message.content)"
"""


DEFAULT_MAX_BATCH_SIZE = 16
"""web and serve's --max-batch-size when not given (serve --engine vllm leaves it to vLLM, which batches far more)."""


def register(subparsers) -> None:
    from tunelab.chat.engine import add_model_arguments, add_sampling_arguments

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("chat", help="chat with a model in the terminal", description=CHAT_DESCRIPTION,
                              formatter_class=fmt)
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--no-streamer", action="store_true", help="print each reply whole instead of streaming it")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="ask this and exit (repeat for a multi-turn conversation)")
    p.add_argument("--image", action="append", metavar="PATH", default=[],
                   help="a picture for a LLaVA model to look at, shown with the first question (repeatable)")
    p.set_defaults(func=chat_cmd)

    for name, description, helptext, default_port in (
            ("web", WEB_DESCRIPTION, "a chat page in the browser", 7860),
            ("serve", SERVE_DESCRIPTION, "an OpenAI-compatible HTTP server", 8000)):
        p = subparsers.add_parser(name, help=helptext, description=description, formatter_class=fmt)
        add_model_arguments(p)
        add_sampling_arguments(p)
        p.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=int, default=default_port)
        p.add_argument("--api-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every request (all paths but /health" +
                            (" and the page itself, which asks for the key)" if name == "web" else ")"))
        p.add_argument("--max-tokens-limit", type=int, default=4096,
                       help="largest max_tokens a request may ask; it also caps --max-new-tokens, the reply length of "
                            "a request that leaves max_tokens out")
        p.add_argument("--max-model-len", type=int, metavar="N",
                       help="prompt + reply tokens a request may use (default: the model's max_position_embeddings; "
                            "e.g. the training max_length to stay where the model was trained)")
        p.add_argument("--max-batch-size", type=int, metavar="N",
                       help=f"requests decoded together (continuous batching; default {DEFAULT_MAX_BATCH_SIZE}" +
                            (", with --engine vllm vLLM's own" if name == "serve" else "") +
                            "); 1 answers them one at a time")
        if name == "serve":
            p.add_argument("--engine", choices=["tunelab", "vllm"], default="tunelab",
                           help="vllm: start vLLM's OpenAI server for a merged model, with its tunelab template")
        p.set_defaults(func=web_cmd if name == "web" else serve_cmd)


def chat_cmd(args) -> int:
    from tunelab.chat.engine import load_from_args, settings_from_args, stop_words_from_args
    from tunelab.chat.terminal import run_chat
    from tunelab.errors import TunelabError

    for i, prompt in enumerate(args.prompt or [], 1):  # e.g. --prompt "$Q" with Q unset: refused before loading
        if not prompt.strip():
            raise TunelabError(f"--prompt {i} is empty: give the question, or leave --prompt out to type questions.")
    settings = settings_from_args(args)
    stop_words = stop_words_from_args(args)
    to_load = None
    if args.image:
        from tunelab.chat.vision import check_chat_images

        to_load = check_chat_images(args.image, args.model, args.adapter)  # a checkpoint checked here, not again
    chat = load_from_args(args, to_load=to_load)
    try:
        return run_chat(chat, settings, stop_words=stop_words, stream=not args.no_streamer, prompts=args.prompt,
                        stdin=sys.stdin, out=sys.stdout, images=args.image)
    finally:
        chat.close()


def _check_server_args(args) -> None:
    from tunelab.errors import TunelabError

    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--max-model-len", args.max_model_len, 2),
                             ("--max-tokens-limit", args.max_tokens_limit, 1)):
        if value is not None and value < low:
            raise TunelabError(f"{flag} {value}: must be at least {low}.")
    if not 1 <= args.port <= 65535:
        raise TunelabError(f"--port {args.port}: must be from 1 to 65535.")
    if args.api_key is not None and not args.api_key.strip():  # e.g. --api-key "$KEY" with KEY unset
        raise TunelabError("--api-key is empty (an unset variable?): give the key, or leave --api-key out to serve "
                           "without one.")


def _serve(args, web: bool) -> int:
    """Check the flags, take the address (a port in use fails here, before minutes of loading), load, serve."""
    from tunelab.chat.engine import load_from_args, settings_from_args, stop_words_from_args
    from tunelab.chat.http_server import listen_sockets, serve

    _check_server_args(args)
    settings = settings_from_args(args)
    stop_words = stop_words_from_args(args)
    sockets = listen_sockets(args.host, args.port)
    try:
        chat = load_from_args(args, max_batch_size=args.max_batch_size or DEFAULT_MAX_BATCH_SIZE)
        kwargs = dict(max_tokens_limit=args.max_tokens_limit, api_key=args.api_key, stop_words=stop_words)
        if web:
            from tunelab.chat.web import create_web_app

            app = create_web_app(chat, settings, **kwargs)
        else:
            from tunelab.chat.server import create_app

            app = create_app(chat, settings, **kwargs)
        serve(app, host=args.host, port=args.port, api_key=args.api_key, sockets=sockets,
              what="chat page" if web else "OpenAI-compatible API")
    finally:
        for sock in sockets:
            sock.close()
    return 0


def web_cmd(args) -> int:
    return _serve(args, web=True)


def serve_cmd(args) -> int:
    if args.engine == "vllm":
        from tunelab.chat.vllm import run_vllm

        _check_server_args(args)
        return run_vllm(args)
    return _serve(args, web=False)
