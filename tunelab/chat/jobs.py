"""A request to the generation worker (`tunelab.chat.batcher`) and what the worker keeps of it while it decodes.

A `Job` is what a caller submits: prompt token ids, its own sampling settings and stop rules (stop words, EOS ids), its
callbacks (`on_text` as the reply grows, `on_done` once), and optionally pictures, log-probabilities to list and a
grammar. A `Row` is a job inside the batch: the tokens it generated, its text so far cut at stop words
(`tunelab.model.generate.ReplyText`), its own seeded generator and its grammar's matcher; `Row.take` adds the chosen
token and says when the reply is done. A `Reply` is how a job ended, handed to `on_done` (or an exception:
`ServerStopping`, `OffGrammar`, or the error of a failed step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tunelab.chat.logprobs import TokenLogprob
from tunelab.model.generate import GenerationSettings, ReplyText


@dataclass
class Reply:
    text: str
    finish_reason: str
    """"stop" (EOS or a stop word), "length" (max_new_tokens) or "cancelled"."""
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
    """The generated token ids (what a test compares with transformers' `generate`)."""


class ServerStopping(RuntimeError):
    """The engine stopped (the server is shutting down) before the reply was finished."""


class Job:
    """One request. `on_text(piece)` gets the reply as it grows and `on_done(Reply or exception)` once, both called
    from the worker thread; `cancel()` may be called from any thread. `logprobs`: None, or how many most likely
    tokens each step lists beside the chosen one's log-probability (OpenAI's top_logprobs), kept in `token_logprobs`
    as the tokens come. `prompt_logprobs`: the prompt's tokens' too (`prompt_token_logprobs`), and every generated
    token's, so that place k is token k of prompt + reply (vLLM's echo, which lm-evaluation-harness scores by)."""

    def __init__(self, prompt_ids: list[int], settings: GenerationSettings, *, stop_words=(), eos_ids=(),
                 on_text: Callable[[str], None] | None = None, on_done: Callable[[object], None] | None = None,
                 pixel_values: torch.Tensor | None = None, logprobs: int | None = None,
                 prompt_logprobs: bool = False, constraint=None):
        self.prompt_ids, self.settings = list(prompt_ids), settings
        self.pixel_values = pixel_values
        """A LLaVA prompt's images, in the order of their image tokens (None: none)."""
        self.constraint = constraint
        """The grammar the reply must follow (`tunelab.chat.grammar.reply_constraint`); None: any text."""
        self.stop_words, self.eos_ids = tuple(stop_words), frozenset(eos_ids)
        self.on_text, self.on_done = on_text, on_done
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.token_logprobs: list[TokenLogprob] = []
        """The reply text's tokens': not an EOS or stop word that ended it (a stream may have sent those of a stop
        word of several tokens before its last one came); with `prompt_logprobs`, every generated token's."""
        self.prompt_token_logprobs: list[TokenLogprob] | None = None
        """With `prompt_logprobs`, once prefilled: the prompt's tokens' but the first (which nothing predicts)."""
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class OffGrammar(RuntimeError):
    """A constrained row's chosen token is not one its grammar allows (its logits were all NaN, say)."""


class Row:
    """A job inside the worker: the tokens it generated and its text so far (and its grammar's matcher)."""

    def __init__(self, job: Job, tokenizer, device):
        self.job, self.settings = job, job.settings
        self.text = ReplyText(tokenizer, job.stop_words, job.on_text)
        self.generated: list[int] = []
        self.generator = None
        if job.settings.seed is not None and not job.settings.greedy:
            self.generator = torch.Generator(device=device).manual_seed(job.settings.seed)
        self.matcher = None
        if job.constraint is not None:
            from tunelab.chat.grammar import new_matcher

            self.matcher = new_matcher(job.constraint)

    def token_ids(self) -> list[int]:
        return self.job.prompt_ids + self.generated

    def take(self, token: int) -> str | None:
        """Add the chosen token; the finish reason once the reply is done."""
        self.generated.append(token)
        if self.matcher is not None:
            if not self.matcher.accept_token(token):
                raise OffGrammar(f"token {token} is not allowed by the reply's grammar")
            if self.matcher.is_terminated():  # the stop token its complete grammar allowed: not text of the reply
                return "stop"
        stop_word = self.text.add(token)
        if stop_word or token in self.job.eos_ids:
            return "stop"
        if len(self.generated) >= self.settings.max_new_tokens:
            return "length"
        return None
