"""Log-probabilities a request asked for (OpenAI's `logprobs`), taken by the generation worker as it decodes.

They are the model's own: the log-softmax of its logits before any sampling setting (temperature, penalties, logit
bias), as vLLM reports them by default. A generated token's comes at each step (`step_logprobs`, for the rows that
asked; the others cost nothing); the prompt's come from the prefill's logits at every place (`prompt_logprobs`), for
/v1/completions' echo. A reply's list covers its text: a stop word that ended it is cut out with it (`trim_to_text`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    """A token's log-probability and the `top` most likely tokens at its place, as (token id, log-probability)."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def step_logprobs(logits: torch.Tensor, tokens: list[int], asked: list[int | None]) -> dict[int, TokenLogprob]:
    """{row: its chosen token's TokenLogprob} for the rows of `logits` ([rows, vocab]) whose `asked` is not None (the
    number of likeliest tokens to list too)."""
    wanted = [i for i, top in enumerate(asked) if top is not None]
    if not wanted:
        return {}
    logprobs = logits[wanted].float().log_softmax(-1)
    most = max(asked[i] for i in wanted)
    best = logprobs.topk(most, dim=-1) if most else None
    chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in wanted], device=logits.device)[:, None])[:, 0]
    found = {}
    for j, (i, logprob) in enumerate(zip(wanted, chosen.tolist())):
        n = asked[i]
        top = list(zip(best.indices[j, :n].tolist(), best.values[j, :n].tolist())) if n else []
        # under a grammar the tokens it does not allow are at -inf: not alternatives (nor valid JSON numbers)
        top = [(t, value) for t, value in top if value != float("-inf")]
        found[i] = TokenLogprob(tokens[i], logprob, top)
    return found


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int, chunk: int = 512) -> list[TokenLogprob]:
    """Each prompt token's log-probability after the ones before it (all but the first), from the prompt's logits
    ([tokens, vocab]), `chunk` places at a time: a long prompt's log-softmax over the whole vocabulary at once would
    take gigabytes."""
    found = []
    for start in range(0, len(prompt_ids) - 1, chunk):
        logprobs = logits[start:min(start + chunk, len(prompt_ids) - 1)].float().log_softmax(-1)
        nexts = torch.tensor(prompt_ids[start + 1:start + 1 + len(logprobs)], device=logits.device)
        chosen = logprobs.gather(1, nexts[:, None])[:, 0].tolist()
        best = logprobs.topk(top, dim=-1) if top else None
        for k, (token, logprob) in enumerate(zip(nexts.tolist(), chosen)):
            alternatives = list(zip(best.indices[k].tolist(), best.values[k].tolist())) if top else []
            found.append(TokenLogprob(token, logprob, alternatives))
    return found


def trim_to_text(kept: list[TokenLogprob], generated: list[int], text: str, tokenizer) -> None:
    """Drop the last of `kept` (the logprobs of `generated`, in order) while the tokens before them already make the
    reply's `text`: the first tokens of a stop word several tokens long, which its last token cut out of the text."""
    while kept and len(tokenizer.decode(generated[:len(kept) - 1], skip_special_tokens=False)) >= len(text):
        kept.pop()
