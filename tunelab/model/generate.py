"""Generating replies: the sampling settings and their allowed ranges, the next-token choice, the reply text.

`generate_reply` answers one conversation with transformers' `generate` (evaluation during training, tests).
The chat engine (`tunelab.chat.batcher`) decodes many conversations at once and uses the pieces here for each step:
`next_tokens` (transformers' own logits processors, applied per group of sequences sharing their settings) and
`ReplyText` (token ids → streamed text, stop words).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tunelab.errors import TunelabError

INT64 = (-(2**63), 2**63 - 1)
GREEDY_BELOW = 1e-5
"""A temperature below this is greedy decoding: dividing logits by it would overflow (vLLM uses the same bound)."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_k: int = 40
    """0 or -1: off."""
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token the reply has used (the prompt's do not count)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once for each time the reply has used it."""
    logit_bias: dict[int, float] | None = None
    """OpenAI's: token id -> a value added to its logit at every step (-100 bans it, 100 all but forces it)."""
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


# The allowed range of each setting: (field, test, rule). One table for the CLI flags and the server's requests, so a
# value that transformers would fail on mid-reply (repetition_penalty=1e-300 divides logits into inf) is refused first.
RULES = (
    ("max_new_tokens", lambda v: v >= 1, "at least 1"),
    ("temperature", lambda v: 0 <= v <= 2, "0 (greedy) or more, at most 2"),
    ("top_k", lambda v: -1 <= v <= 2**31 - 1, "0 or -1 (off), or a positive number of tokens"),
    ("top_p", lambda v: 0 < v <= 1, "above 0 and at most 1"),
    ("repetition_penalty", lambda v: 0.01 <= v <= 10, "above 0 (from 0.01 to 10; 1 = off)"),
    ("presence_penalty", lambda v: -2 <= v <= 2, "from -2 to 2 (0 = off)"),
    ("frequency_penalty", lambda v: -2 <= v <= 2, "from -2 to 2 (0 = off)"),
    ("logit_bias", lambda v: v is None or all(-100 <= b <= 100 for b in v.values()), "a value from -100 to 100 for "
                                                                                      "each token"),
    ("seed", lambda v: v is None or INT64[0] <= v <= INT64[1], f"an integer from {INT64[0]} to {INT64[1]}"),
)


def check_settings(settings: GenerationSettings, names: dict[str, str] | None = None) -> None:
    """Raise `SettingError` naming the first setting out of its range (as the user spelled it: `names[field]`)."""
    names = names or {}
    for field, ok, rule in RULES:
        value = getattr(settings, field)
        if not ok(value):
            raise SettingError(names.get(field, field), f"{names.get(field, field)} {value!r}: must be {rule}.")


class SettingError(TunelabError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@torch.inference_mode()
def next_tokens(logits: torch.Tensor, rows: list) -> list[int]:
    """The next token of each row of `logits` ([rows, vocab]); `rows[i]` has `.settings`, `.generator` (or None),
    `.token_ids()` (prompt + reply so far, for the repetition penalty) and `.generated` (the reply's tokens, for the
    presence and frequency penalties). In vLLM's order: the logit bias, then rows with equal settings together through
    transformers' processors in `generate`'s order (repetition penalty, temperature, top-k, top-p), the presence and
    frequency penalties after the repetition penalty."""
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    logits = logits.float()
    if any(row.settings.logit_bias for row in rows):
        logits = logits.clone()  # the caller's logits stay the model's (float() of float32 is the same tensor)
    for i, row in enumerate(rows):
        if row.settings.logit_bias:
            ids = torch.tensor(list(row.settings.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(row.settings.logit_bias.values()), device=logits.device)
    chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        s = row.settings
        penalties = (s.repetition_penalty, s.presence_penalty, s.frequency_penalty)
        key = (penalties, True, 0, 1.0) if s.greedy else (penalties, s.temperature, max(s.top_k, 0), s.top_p)
        groups.setdefault(key, []).append(i)
    for ((penalty, presence, frequency), temperature, top_k, top_p), members in groups.items():
        index = torch.tensor(members, device=logits.device)
        scores = logits[index]
        if penalty != 1.0:
            seen = [rows[i].token_ids() for i in members]
            width = max(len(ids) for ids in seen)
            # rows are padded with their own first token: scoring a token twice changes nothing
            ids = torch.tensor([ids + ids[:1] * (width - len(ids)) for ids in seen], device=logits.device)
            scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
        if presence or frequency:
            for j, i in enumerate(members):
                counts = torch.bincount(torch.tensor(rows[i].generated, dtype=torch.long, device=logits.device),
                                        minlength=scores.shape[-1])[:scores.shape[-1]]
                scores[j] -= frequency * counts + presence * (counts > 0)
        if temperature is True:
            chosen[index] = scores.argmax(-1)
            continue
        if temperature != 1.0:
            scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(min(top_k, scores.shape[-1]))(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)
        for j, i in enumerate(members):  # each row draws from its own generator: a seed gives the same reply alone
            chosen[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]  # or in any batch
    return chosen.tolist()


def cut_at_stop_words(text: str, stop_words) -> str:
    cut = len(text)
    for word in stop_words:
        i = text.find(word)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


class ReplyText:
    """The text of a reply as its tokens arrive: streams new text to `on_text`, holding back a tail that could be the
    start of a stop word or an incomplete UTF-8 character, and says when a stop word appeared.

    Tokens are decoded a few at a time with the previous ones as context (as vLLM does): decoding all of them every
    step costs time that grows with the reply, and decoding each alone loses the spaces sentencepiece puts between them.
    """

    def __init__(self, tokenizer, stop_words, on_text: Callable[[str], None] | None = None):
        self.tokenizer, self.stop_words, self.on_text = tokenizer, tuple(stop_words), on_text
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0  # ids[prefix:read] were decoded already; ids[read:] are new
        self.sent = 0
        self.hold = max((len(w) for w in self.stop_words), default=0)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def add(self, token: int) -> bool:
        """Take one token; True once the text holds a stop word."""
        self.ids.append(token)
        if not self.stop_words and not self.on_text:  # nothing to look for, no one to tell: decode once, at the end
            return False
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        tail = self.text[-(len(now) + self.hold):]  # a stop word can only end in the new text
        done = any(w in tail for w in self.stop_words) if self.stop_words else False
        if self.on_text and not done:
            safe = max(self.sent, len(self.text) - self.hold)
            if safe > self.sent:
                self.on_text(self.text[self.sent:safe])
                self.sent = safe
        return done

    def finish(self) -> str:
        """The whole reply, cut at the first stop word; sends what was held back."""
        reply = cut_at_stop_words(self._decode(self.ids), self.stop_words)
        if self.on_text and len(reply) > self.sent:
            self.on_text(reply[self.sent:])
            self.sent = len(reply)
        return reply


def stop_words_for(template, tokenizer, extra=()) -> tuple[str, ...]:
    """The template's stop words, the tokenizer's EOS text and the caller's, in that order, without repeats."""
    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    return tuple(dict.fromkeys([*template.stop_words, *eos, *extra]))


def stop_token_ids(template, tokenizer) -> list[int]:
    """The ids of the template's stop words that are tokens of their own (<|im_end|>, <|eot_id|>): where a stop word
    must be a token id (an exported generation_config's eos_token_id, a grammar's stop tokens)."""
    vocab = tokenizer.get_vocab()
    return [vocab[word] for word in getattr(template, "stop_words", ()) if word in vocab]


@torch.inference_mode()
def generate_reply(model, tokenizer, template, messages: list[dict], settings: GenerationSettings | None = None,
                   *, stop_words: tuple[str, ...] = (), on_text: Callable[[str], None] | None = None,
                   pixel_values: torch.Tensor | None = None, image_tokens=None) -> str:
    """The model's reply to `messages` (OpenAI-style dicts), rendered with `template`, by transformers' `generate`.
    A LLaVA model's pictures: `pixel_values`, one per <image> in the messages, each <image> expanded to
    `image_tokens.per_image` tokens (`tunelab.data.multimodal.ImageTokens`)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    settings = settings or GenerationSettings()
    ids = torch.tensor([template.prompt_ids(tokenizer, messages)])
    extra = {}
    if pixel_values is not None:
        expanded: list[int] = []
        for t in ids[0].tolist():
            expanded += [t] * image_tokens.per_image if t == image_tokens.token_id else [t]
        ids = torch.tensor([expanded])
        extra["pixel_values"] = pixel_values.to(next(model.parameters()).device)
    ids = ids.to(next(model.parameters()).device)
    text = ReplyText(tokenizer, stop_words_for(template, tokenizer, stop_words), on_text)

    class StopOnWords(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = text.add(int(input_ids[0, -1]))
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    sample = not settings.greedy
    gen_kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        repetition_penalty=settings.repetition_penalty,
        stopping_criteria=StoppingCriteriaList([StopOnWords()]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        attention_mask=torch.ones_like(ids),
    )
    if sample:
        gen_kwargs.update(temperature=settings.temperature, top_k=max(settings.top_k, 0), top_p=settings.top_p)
    else:
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)
    was_training = model.training
    model.eval()
    try:
        model.generate(input_ids=ids, **gen_kwargs, **extra)
    finally:
        model.train(was_training)
    reply = text.finish()
    return reply.strip() if not on_text else reply
