"""A reply's reasoning apart from its answer, for the templates that write one (`ReasoningFormat`, learnt from the
template by `tunelab.data.templates.reasoning_format`: Qwen3's and DeepSeek-R1's <think>...</think>).

`split_reasoning(text, fmt)` splits a whole reply; `ReasoningStream(fmt)` splits it as its pieces arrive, giving the
same two texts whatever the pieces (a marker cut between two pieces too): it holds back only what could still be the
start of a marker, or whitespace that may turn out to lie next to one.

The split is the inverse of what the template writes, so that a client sending the reply back (answer as content,
reasoning as reasoning_content) gets the prompt training would render: the reasoning without the whitespace around it,
the answer without the whitespace after the close marker (Qwen3's and DeepSeek-R1's '\\n\\n'). A reply starts inside
the block where the generation prompt opened it (DeepSeek-R1), else only when it starts with the open marker
(Qwen3); a block never closed (a reply cut by max_tokens) is all reasoning.
"""

from __future__ import annotations

REASONING, ANSWER = "reasoning_content", "content"
"""The keys of a reply's two parts, as training data holds a reply (the templates read `reasoning_content`)."""

WIRE_NAMES = (REASONING, "reasoning")
"""The names the reasoning goes by in OpenAI-compatible messages: `reasoning_content` (DeepSeek's API, SGLang, vLLM
until late 2025), `reasoning` (vLLM since, following OpenAI's guidance for gpt-oss: for a while beside the old name,
alone since early 2026). Clients read one or the other, so `tunelab serve` sends both (the same text) and reads either
back."""


def on_the_wire(part: dict) -> dict:
    """A reply's parts (`REASONING` / `ANSWER` keys) as a served message or delta: the reasoning under each of
    `WIRE_NAMES`."""
    return {name: text for key, text in part.items() for name in (WIRE_NAMES if key == REASONING else (key,))}


def split_reasoning(text: str, fmt) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply: reasoning None where the reply has no reasoning block, or `fmt` is None
    (the template writes none; then the answer is the text as it is), '' for an empty block (Qwen3's before a plain
    reply)."""
    if fmt is None:
        return None, text
    stream = ReasoningStream(fmt)
    parts = [stream.feed(text), stream.finish()]
    reasoning = "".join(p.get(REASONING, "") for p in parts)
    answer = "".join(p.get(ANSWER, "") for p in parts)
    return (reasoning if stream.had_block else None), answer


def answer_part(text: str, fmt) -> tuple[str | None, str]:
    """(reasoning, answer) of a text the template wrote (a reference): a text without the close marker has no
    reasoning block (DeepSeek-R1 writes none where a reply has no reasoning, though its prompt opens one)."""
    if fmt is None or fmt.close not in text:
        return None, text
    return split_reasoning(text, fmt)


def _partial(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker` (0: none)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ReasoningStream:
    """`feed(piece)` -> {"reasoning_content"?: text, "content"?: text}: what of the reply so far can be told apart;
    `finish()` -> the rest. The pieces of each key joined are `split_reasoning`'s texts."""

    def __init__(self, fmt):
        self.fmt = fmt
        self.state = "start"  # -> "reasoning" -> "after" (the close marker seen) -> "answer"; or "answer" at once
        self.had_block = False
        self.held = ""
        self.sent_reasoning = False

    def feed(self, piece: str) -> dict:
        self.held += piece
        out: dict = {}
        while True:
            before = self.state
            self._step(out, final=False)
            if self.state == before:
                return out

    def finish(self) -> dict:
        out: dict = {}
        while True:
            before = self.state
            self._step(out, final=True)
            if self.state == before:
                break
        if self.state == "reasoning":  # never closed (cut by max_tokens): all reasoning
            self._reasoning(out, self.held.rstrip())
        self.held = ""
        return out

    def _step(self, out: dict, final: bool) -> None:
        fmt, held = self.fmt, self.held
        if self.state == "start":
            body = held.lstrip()
            if fmt.open and body.startswith(fmt.open):  # (a model may open the block the prompt opened)
                self.held, self.state, self.had_block = body[len(fmt.open):], "reasoning", True
            elif not final and (not body or (fmt.open and fmt.open.startswith(body))):
                return  # whitespace, or the start of the marker: wait for more
            elif fmt.opened:
                self.held, self.state, self.had_block = body, "reasoning", True
            else:
                self.held, self.state = "", "answer"
                out[ANSWER] = out.get(ANSWER, "") + held
        elif self.state == "reasoning":
            at = held.find(fmt.close)
            if at >= 0:
                self._reasoning(out, held[:at].rstrip())
                self.held, self.state = held[at + len(fmt.close):], "after"
                return
            keep = _partial(held, fmt.close)
            ready = held[:len(held) - keep].rstrip()  # whitespace before the marker is not reasoning
            self._reasoning(out, ready)
            self.held = held[len(ready):]
        elif self.state == "after":
            body = held.lstrip()
            if body:
                self.held, self.state = "", "answer"
                out[ANSWER] = out.get(ANSWER, "") + body
            else:
                self.held = ""
        elif held:  # "answer": as it comes
            self.held = ""
            out[ANSWER] = out.get(ANSWER, "") + held

    def _reasoning(self, out: dict, text: str) -> None:
        if not self.sent_reasoning:
            text = text.lstrip()
        if text:
            self.sent_reasoning = True
            out[REASONING] = out.get(REASONING, "") + text
