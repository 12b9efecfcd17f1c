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
  printf 'Who are you?\\nWhat can you do?\\n' | tunelab chat merged
"""

WEB_DESCRIPTION = """\
A chat page in the browser (sampling settings, system prompt, clear history), served on 127.0.0.1 by default.
The page talks to the same OpenAI-compatible API as `tunelab serve` (also available while it runs).

example:
  tunelab web merged
  tunelab web internlm/internlm2-chat-1_8b --adapter hf_adapter --port 7860
"""

SERVE_DESCRIPTION = """\
An OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions (stream or not), on 127.0.0.1 by default.
Requests are answered one at a time, in turn.

example:
  tunelab serve merged --port 8000
  python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x'); \\
print(c.chat.completions.create(model='merged', messages=[{'role': 'user', 'content': 'Hi'}]).choices[0].message.content)"
"""


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
        if name == "serve":
            p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
        p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
        p.set_defaults(func=web_cmd if name == "web" else serve_cmd)


def chat_cmd(args) -> int:
    from tunelab.chat.engine import load_from_args, settings_from_args
    from tunelab.chat.terminal import run_chat

    settings = settings_from_args(args)
    chat = load_from_args(args)
    return run_chat(chat, settings, stop_words=args.stop_word, stream=not args.no_streamer, prompts=args.prompt,
                    stdin=sys.stdin, out=sys.stdout)


def _app(args, web: bool):
    from tunelab.chat.engine import load_from_args, settings_from_args

    settings = settings_from_args(args)
    chat = load_from_args(args)
    kwargs = dict(max_tokens_limit=args.max_tokens_limit, api_key=getattr(args, "api_key", None))
    if web:
        from tunelab.chat.web import create_web_app

        return create_web_app(chat, settings, **kwargs)
    from tunelab.chat.server import create_app

    return create_app(chat, settings, **kwargs)


def web_cmd(args) -> int:
    from tunelab.chat.server import serve

    serve(_app(args, web=True), host=args.host, port=args.port, what="chat page")
    return 0


def serve_cmd(args) -> int:
    from tunelab.chat.server import serve

    serve(_app(args, web=False), host=args.host, port=args.port)
    return 0
