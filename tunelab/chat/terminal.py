"""`tunelab chat`: talk to a model in the terminal, with streamed replies and multi-turn history.

Interactive (a TTY): type a question, end it with an empty line (so questions may span lines), as in XTuner.
RESET clears the history, EXIT quits. `--image` pictures go with the first question (a LLaVA model). Non-interactive (`--prompt`, or questions on stdin one per line): each
question is answered in turn, in one conversation, and only the replies go to stdout, so scripts can read them.
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

from tunelab.chat.engine import ChatModel, ContextError

PROMPT = "\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> "


def _read_interactive(stdin: TextIO, out: TextIO) -> str | None:
    """One question: lines until an empty line. None at end of input."""
    out.write(PROMPT)
    out.flush()
    lines = []
    while True:
        line = stdin.readline()
        if not line:  # Ctrl-D
            return "\n".join(lines) if lines else None
        line = line.rstrip("\n")
        if line.strip() == "" and lines:
            return "\n".join(lines)
        if line.strip() in ("EXIT", "RESET") and not lines:
            return line.strip()
        if line.strip() or lines:
            lines.append(line)


def _questions_from(stdin: TextIO) -> Iterable[str]:
    for line in stdin:
        line = line.strip()
        if line:
            yield line


def answer(chat: ChatModel, history: list[dict], question: str, settings, *, stop_words=(), stream: bool = True,
           out: TextIO = sys.stdout, images: list[str] = ()) -> str:
    """Add `question` to `history`, print the reply (streamed piece by piece if `stream`), add the reply too.
    `images`: picture files shown with this question (a LLaVA model)."""
    from tunelab.chat.vision import with_images

    history.append({"role": "user", "content": with_images(question, list(images)) if images else question})

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        reply = chat.reply(history, settings, stop_words=stop_words, on_text=write if stream else None, files=True)
    except ContextError:
        history.pop()  # the question got no answer: leave it out of the conversation
        raise
    if stream:
        out.write("\n")
    else:
        out.write(reply.strip() + "\n")
    out.flush()
    history.append({"role": "assistant", "content": reply.strip()})
    return reply.strip()


def run_chat(chat: ChatModel, settings, *, stop_words=(), stream: bool = True, prompts: list[str] | None = None,
             stdin: TextIO | None = None, out: TextIO | None = None, images: list[str] = ()) -> int:
    """`images`: picture files shown with the first question (again after RESET)."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    history: list[dict] = []
    interactive = prompts is None and stdin.isatty()
    if interactive:
        out.write(f"chatting with {chat.name} (template {chat.template.name})\n")
        questions: Iterable[str | None] = iter(lambda: _read_interactive(stdin, out), None)
    else:
        questions = prompts if prompts is not None else _questions_from(stdin)
    unanswered = 0
    for question in questions:
        if question.strip() == "EXIT":
            break
        if question.strip() == "RESET":
            history.clear()  # the pictures come again with the next question
            if interactive:
                out.write("history cleared\n")
            continue
        if interactive:
            out.write("\n")
        try:
            answer(chat, history, question, settings, stop_words=stop_words, stream=stream, out=out,
                   images=images if not history else ())
        except ContextError as exc:  # the conversation outgrew the context: say so, keep the session
            unanswered += 1
            print(f"error: {exc} Type RESET to start a new conversation.", file=sys.stderr if not interactive else out)
    return 1 if unanswered and not interactive else 0  # a script learns that a question got no answer
