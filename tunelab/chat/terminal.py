"""`tunelab chat`: talk to a model in the terminal, with streamed replies and multi-turn history.

Interactive (a TTY): type a question, end it with an empty line (so questions may span lines), as in XTuner.
RESET clears the history, EXIT quits. `--image` pictures go with the first question (a LLaVA model). Non-interactive (`--prompt`, or questions on stdin one per line): each
question is answered in turn, in one conversation, and only the replies go to stdout, so scripts can read them.

A model whose template writes reasoning (Qwen3's, DeepSeek-R1's <think>...</think>) shows it apart from the answer:
dim and italic on a terminal, else each line after "thinking: " (on stderr when not interactive, so stdout holds the
answers alone); the history keeps the answer as content and the reasoning as reasoning_content, as training data
holds a reply.
"""

from __future__ import annotations

import re
import sys
from typing import Iterable, TextIO

from tunelab.chat.engine import ChatModel, ContextError
from tunelab.chat.reasoning import ANSWER, REASONING, ReasoningStream, split_reasoning

DIM, PLAIN = "\x1b[2;3m", "\x1b[0m"
"""ANSI: dim italic text (a reply's reasoning on a terminal), and back to plain."""
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


class Thinking:
    """Writes reasoning apart from the answer: dim and italic on a terminal, else each line after 'thinking: '."""

    def __init__(self, out: TextIO):
        self.out, self.tty = out, bool(getattr(out, "isatty", lambda: False)())
        self.open = self.line_start = False

    def write(self, text: str) -> None:
        if not text:
            return
        if not self.open:
            self.out.write(DIM if self.tty else "")
            self.open = self.line_start = True
        for line in re.findall(r"[^\n]*\n|[^\n]+", text):
            self.out.write(("thinking: " if self.line_start and not self.tty else "") + line)
            self.line_start = line.endswith("\n")
        self.out.flush()

    def end(self) -> None:
        """Before the answer: the reasoning's own lines end."""
        if self.open:
            self.out.write((PLAIN if self.tty else "") + ("" if self.line_start else "\n"))
            self.out.flush()
            self.open = False


def answer(chat: ChatModel, history: list[dict], question: str, settings, *, stop_words=(), stream: bool = True,
           out: TextIO = sys.stdout, images: list[str] = (), thoughts: TextIO | None = None) -> str:
    """Add `question` to `history`, print the reply (streamed piece by piece if `stream`), add the reply too.
    `images`: picture files shown with this question (a LLaVA model). `thoughts`: where a reply's reasoning is
    shown (default `out`); the answer alone is returned."""
    from tunelab.chat.vision import with_images

    history.append({"role": "user", "content": with_images(question, list(images)) if images else question})
    if chat.reasoning is not None:
        return _answer_apart(chat, history, settings, stop_words, stream, out, Thinking(thoughts or out))

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


def _answer_apart(chat: ChatModel, history: list[dict], settings, stop_words, stream: bool, out: TextIO,
                  thinking: Thinking) -> str:
    """`answer` for a template that writes reasoning: the reasoning shown by `thinking`, then the answer."""
    split = ReasoningStream(chat.reasoning)

    def show(parts: dict) -> None:
        thinking.write(parts.get(REASONING, ""))
        if parts.get(ANSWER):
            thinking.end()
            out.write(parts[ANSWER])
            out.flush()

    try:
        reply = chat.reply(history, settings, stop_words=stop_words, files=True,
                           on_text=(lambda piece: show(split.feed(piece))) if stream else None)
    except ContextError:
        history.pop()
        raise
    reasoning, text = split_reasoning(reply, chat.reasoning)
    if stream:
        show(split.finish())
    else:
        show({REASONING: reasoning or "", ANSWER: text.strip()})
    thinking.end()
    out.write("\n")
    out.flush()
    history.append({"role": "assistant", "content": text.strip(), **({REASONING: reasoning} if reasoning else {})})
    return text.strip()


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
                   images=images if not history else (), thoughts=out if interactive else sys.stderr)
        except ContextError as exc:  # the conversation outgrew the context: say so, keep the session
            unanswered += 1
            print(f"error: {exc} Type RESET to start a new conversation.", file=sys.stderr if not interactive else out)
    return 1 if unanswered and not interactive else 0  # a script learns that a question got no answer
