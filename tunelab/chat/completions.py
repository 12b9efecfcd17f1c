"""`tunelab serve`'s /v1/completions: OpenAI's (legacy) text completion, as vLLM serves it.

The prompt is continued as it is, with no chat template: a base model after continued pretraining, a prompt already
written in the template's form, or a tool that sends raw text (lm-evaluation-harness's `local-completions`
generation tasks). A text prompt is tokenised as vLLM does (with the tokenizer's special tokens, e.g. Llama's BOS);
token ids are taken as they are. Each prompt of a list (and each of its `n` replies) is a choice of its own, decoded
in the same batch. A reply
ends where a chat reply does: EOS, the template's stop words (the model's own end of a turn), the request's `stop`,
`max_tokens`. The sampling fields, `response_format` (the JSON from the reply's first token), limits and errors are
/v1/chat/completions' (`tunelab.chat.requests`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from tunelab.chat.engine import ChatModel
from tunelab.chat.grammar import reply_constraint, wants_json
from tunelab.chat.logprobs import TokenLogprob
from tunelab.chat.requests import CompletionRequest, RequestError, check_token_ids, settings_for
from tunelab.chat.wire import (DONE, error_event, event, event_stream, replies_usage, reporter, sample_settings,
                               submit_all, token_text, wait_for_all)


def prompt_token_ids(tokenizer, prompt, image_token: int | None = None) -> list[list[int]]:
    """Each prompt of a request as token ids (a validated `CompletionRequest.prompt`): a text or texts tokenised,
    ids checked to be the tokenizer's; a LLaVA model's `image_token` refused (a completion carries no picture)."""
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        texts = [prompt] if isinstance(prompt, str) else prompt
        prompts = [tokenizer(text)["input_ids"] for text in texts]
    else:
        prompts = prompt if isinstance(prompt[0], list) else [prompt]
    for i, ids in enumerate(prompts):
        where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
        if not ids:
            raise RequestError(f"{where} is empty: give the text (or token ids) to continue.", "prompt")
        if image_token is not None and image_token in ids:
            raise RequestError(f"{where} holds the image token {tokenizer.convert_ids_to_tokens(image_token)!r}, and "
                               f"a completion carries no picture: send pictures to /v1/chat/completions as image "
                               f"parts.", "prompt")
        check_token_ids(ids, len(tokenizer), where, "prompt")
    return prompts


def legacy_logprobs(tokenizer, entries: list[TokenLogprob], offset: int, prompt: list[int] | None = None,
                    prompt_entries: list[TokenLogprob] = ()) -> dict:
    """The completion API's `logprobs`: parallel lists of the tokens, their log-probabilities, the likeliest tokens
    at each place ({text: log-probability}) and where each token's text starts (in the tokens' texts joined, from
    `offset`: the texts of the tokens before, in a stream). With the
    `prompt` (echo), its tokens come first, the first with None for both (nothing predicts it), as vLLM sends them."""
    head = [] if prompt is None else [(prompt[0], None, None)] + [(e.token, e.logprob, e.top) for e in prompt_entries]
    places = head + [(e.token, e.logprob, e.top) for e in entries]
    tokens = [token_text(tokenizer, token) for token, _, _ in places]
    starts = []
    for text in tokens:
        starts.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [logprob for _, logprob, _ in places],
            "top_logprobs": [None if top is None else {token_text(tokenizer, t): lp for t, lp in top}
                             for _, _, top in places],
            "text_offset": starts}


def completion_route(chat: ChatModel, defaults, *, max_tokens_limit: int, stop_words=()):
    """The handler of POST /v1/completions (`defaults`, `stop_words`: as `create_app` takes them)."""

    async def completions(body: CompletionRequest, request: Request):
        settings, asked = settings_for(body, defaults, max_tokens_limit, len(chat.tokenizer))
        if body.suffix:
            raise RequestError("suffix: not supported (the model writes after the prompt, never before a given end): "
                               "leave it out.", "suffix")
        if body.best_of not in (None, 1):
            raise RequestError(f"best_of {body.best_of}: only 1 is supported (one reply for each prompt).", "best_of")
        prompts = await run_in_threadpool(prompt_token_ids, chat.tokenizer, body.prompt,
                                          chat.vision.token_id if chat.vision is not None else None)
        constraint = None  # one grammar, a matcher of it for each prompt's reply
        if wants_json(body.response_format):  # a new schema takes a while to compile: not on the event loop
            constraint = await run_in_threadpool(reply_constraint, chat, body.response_format, templated=False)
        each = [dataclasses.replace(settings, max_new_tokens=chat.fit_reply(
            len(ids), settings.max_new_tokens, asked=asked, prompt_field="prompt")) for ids in prompts]
        echoed = [""] * len(prompts)
        if body.echo:  # a text as it was sent; token ids as their text
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            echoed = texts if isinstance(texts[0], str) else \
                [chat.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
        echoed = [text for text in echoed for _ in range(body.n)]  # choice k: prompt k // n, its reply k % n
        events: asyncio.Queue = asyncio.Queue()
        report = reporter(events)
        stop = list(stop_words if body.stop is None else body.stop)
        samples = [(ids, sample) for ids, prompt_settings in zip(prompts, each)
                   for sample in sample_settings(prompt_settings, body.n)]
        jobs = [chat.job(ids, sample, stop_words=stop, ignore_eos=body.ignore_eos,
                         on_text=report(k) if body.stream else None, on_done=report(k), logprobs=body.logprobs,
                         prompt_logprobs=body.echo and body.logprobs is not None, constraint=constraint)
                for k, (ids, sample) in enumerate(samples)]
        submit_all(chat, jobs)
        reply_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            return event_stream(_stream(chat, jobs, events, reply_id, echoed, body.include_usage, prompt_tokens))
        replies = await wait_for_all(jobs, events, request)
        if not isinstance(replies, list):
            return replies  # the client left, or a reply failed
        choices = [{"index": k, "text": echoed[k] + reply.text, "finish_reason": reply.finish_reason,
                    "logprobs": None if body.logprobs is None else _logprobs(chat, job)}
                   for k, (job, reply) in enumerate(zip(jobs, replies))]
        return {"id": reply_id, "object": "text_completion", "created": int(time.time()), "model": chat.name,
                "choices": choices, "usage": replies_usage(replies, prompt_tokens)}

    return completions


def _logprobs(chat: ChatModel, job) -> dict:
    """A whole choice's logprobs: with echo, from the prompt's first token, else the reply's."""
    echoed = job.prompt_logprobs
    return legacy_logprobs(chat.tokenizer, job.token_logprobs, 0, job.prompt_ids if echoed else None,
                           job.prompt_token_logprobs if echoed else ())


async def _stream(chat: ChatModel, jobs: list, events: asyncio.Queue, reply_id: str, echoed: list[str],
                  include_usage: bool, prompt_tokens: int):
    """Server-sent events in OpenAI's completion chunk format: each prompt's text as it comes, under its `index`,
    with the logprobs of the tokens since its last chunk; a chunk with its finish_reason when it ends; with
    `include_usage`, a last chunk of empty choices holding the usage. A failure is an error event; a client that
    goes away cancels every prompt (starlette cancels this generator)."""
    created = int(time.time())
    sent, offsets = [0] * len(jobs), [0] * len(jobs)
    prompt_to_send = [job.prompt_logprobs for job in jobs]
    replies = {}

    def chunk(i: int | None, text: str = "", finish: str | None = None, usage: dict | None = None) -> str:
        choices = []
        if i is not None:
            job, logprobs = jobs[i], None
            # with echo, the prompt's logprobs go first, with the first chunk after the prefill made them
            if job.logprobs is not None and not (prompt_to_send[i] and job.prompt_token_logprobs is None):
                new = job.token_logprobs[sent[i]:]
                sent[i] += len(new)
                prompt = job.prompt_ids if prompt_to_send[i] else None
                prompt_to_send[i] = False
                logprobs = legacy_logprobs(chat.tokenizer, new, offsets[i], prompt, job.prompt_token_logprobs or ())
                offsets[i] += sum(map(len, logprobs["tokens"]))
            choices = [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]
        body = {"id": reply_id, "object": "text_completion", "created": created, "model": chat.name,
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return event(body)

    try:
        for i, text in enumerate(echoed):
            if text:
                yield chunk(i, text)
        while len(replies) < len(jobs):
            i, item = await events.get()
            if isinstance(item, str):
                yield chunk(i, item)
            elif isinstance(item, Exception):
                yield error_event(item)
                break
            else:
                replies[i] = item
                yield chunk(i, finish=item.finish_reason)
        else:
            if include_usage:
                yield chunk(None, usage=replies_usage(list(replies.values()), prompt_tokens))
        yield DONE
    finally:
        for job in jobs:
            job.cancel()
