"""One assistant reply for a conversation: used by evaluation during training, chat, the web page and the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    seed: int | None = None


class _StopOnWords:
    """Stops generation once the new text contains a stop word; streams text as it grows."""

    def __init__(self, tokenizer, prompt_len: int, stop_words, on_text: Callable[[str], None] | None):
        self.tokenizer, self.prompt_len, self.stop_words, self.on_text = tokenizer, prompt_len, stop_words, on_text
        self.sent = 0
        self.text = ""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.text = self.tokenizer.decode(input_ids[0, self.prompt_len:], skip_special_tokens=False)
        done = any(w in self.text for w in self.stop_words)
        if self.on_text:
            visible = cut_at_stop_words(self.text, self.stop_words)
            # Hold back a tail that could be the start of a stop word, and incomplete UTF-8 ("\ufffd").
            safe = len(visible) if done else max(0, len(visible) - max((len(w) for w in self.stop_words), default=0))
            safe = min(safe, len(visible.rstrip("\ufffd")))
            if safe > self.sent:
                self.on_text(visible[self.sent:safe])
                self.sent = safe
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def flush(self, final_text: str) -> None:
        if self.on_text and len(final_text) > self.sent:
            self.on_text(final_text[self.sent:])
            self.sent = len(final_text)


def cut_at_stop_words(text: str, stop_words) -> str:
    cut = len(text)
    for word in stop_words:
        i = text.find(word)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@torch.inference_mode()
def generate_reply(model, tokenizer, template, messages: list[dict], settings: GenerationSettings | None = None,
                   *, stop_words: tuple[str, ...] = (), on_text: Callable[[str], None] | None = None) -> str:
    """The model's reply to `messages` (OpenAI-style dicts), rendered with `template`."""
    from transformers import StoppingCriteriaList

    settings = settings or GenerationSettings()
    prompt = template.render(messages, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    stops = tuple(dict.fromkeys([*template.stop_words, *stop_words, *( [tokenizer.eos_token] if tokenizer.eos_token else [])]))
    stopper = _StopOnWords(tokenizer, ids.shape[1], stops, on_text)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    sample = settings.temperature > 0
    gen_kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        repetition_penalty=settings.repetition_penalty,
        stopping_criteria=StoppingCriteriaList([stopper]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        attention_mask=torch.ones_like(ids),
    )
    if sample:
        gen_kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    else:
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, **gen_kwargs)
    finally:
        model.train(was_training)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    reply = cut_at_stop_words(text, stops)
    stopper.flush(reply)
    return reply.strip() if not on_text else reply
