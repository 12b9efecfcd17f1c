"""OpenAI's wire format where /v1/chat/completions and /v1/completions share it: the error shape, a request's replies
awaited while watching for the client to leave, their usage, the settings of each of `n` replies, a token's text."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tunelab.chat.jobs import Reply, ServerStopping
from tunelab.chat.requests import RequestError
from tunelab.model.generate import INT64


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape, as a response's body or a stream's error event."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    message = message.encode("utf-8", "backslashreplace").decode()  # a lone surrogate quoted back must not fail here
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))


DONE = "data: [DONE]\n\n"
"""The last event of a stream."""


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
"""Characters JSON leaves raw inside strings that httpx's and Python's line splitters take for line ends: escaped, an
event stays one line for every client (SSE itself ends lines at CR and LF only)."""


def event(body: dict) -> str:
    """A server-sent event holding `body` (a chunk) as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def error_event(error: Exception) -> str:
    """A failure inside a stream, as an event of OpenAI's error shape (never a dead connection)."""
    return event(error_body(getattr(error, "status", 500), str(error), getattr(error, "param", None)))


def event_stream(events) -> StreamingResponse:
    """The response that sends `events` (an async generator of server-sent events) as they come."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def wait_or_cancel(events: asyncio.Queue, request: Request):
    """The job's outcome, or None once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


def failure_response(error: Exception) -> JSONResponse:
    if isinstance(error, ServerStopping):
        return error_response(503, str(error))
    return error_response(500, f"generation failed: {type(error).__name__}: {error}")


def reporter(events: asyncio.Queue):
    """`report(k)`: the callback with which job k hands `events` (k, a piece of its text or its outcome), from the
    worker thread to the event loop that awaits them. Call it on that loop."""
    loop = asyncio.get_running_loop()

    def report(k: int):
        return lambda item: loop.call_soon_threadsafe(events.put_nowait, (k, item))
    return report


def submit_all(chat, jobs: list) -> None:
    """Hand a request's jobs to the engine; all of them, or (the server shutting down) none, as a 503."""
    try:
        for job in jobs:
            chat.batcher.submit(job)
    except ServerStopping as exc:
        for job in jobs:
            job.cancel()
        raise RequestError(str(exc), status=503) from None


async def wait_for_all(jobs: list, events: asyncio.Queue, request: Request):
    """The replies of `jobs`, in their order, from `events` ((index, Reply or exception) as each job reports); or the
    response to send instead: 499 once the client has gone, the failure of a reply that failed. Every job is
    cancelled at the end (a reply still running when another failed, or the client left, stops at the next step)."""
    replies: dict[int, Reply] = {}
    try:
        while len(replies) < len(jobs):
            event = await wait_or_cancel(events, request)
            if event is None:
                return error_response(499, "the client closed the request")
            i, reply = event
            if isinstance(reply, Exception):
                return failure_response(reply)
            replies[i] = reply
    finally:
        for job in jobs:
            job.cancel()
    return [replies[i] for i in range(len(jobs))]


def replies_usage(replies: list[Reply], prompt_tokens: int | None = None) -> dict:
    """The usage of a request's replies: their tokens, and its prompt's once (`prompt_tokens`: several prompts')."""
    prompt = replies[0].prompt_tokens if prompt_tokens is None else prompt_tokens
    completion = sum(reply.completion_tokens for reply in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sample_settings(settings, n: int) -> list:
    """The settings of each of a request's `n` replies (OpenAI's `n`): the same but for the seed, so that seeded
    replies differ from one another yet come again alike; the first keeps the request's seed, so that reply 0 is
    what `n: 1` gives. Greedy replies are all one reply, as vLLM's are."""
    if settings.seed is None:
        return [settings] * n
    low, span = INT64[0], 2**64
    return [dataclasses.replace(settings, seed=(settings.seed + i - low) % span + low) for i in range(n)]


def token_text(tokenizer, token: int) -> str:
    """A token as logprobs show it: its own text (a piece of a character that needs the next token shows as U+FFFD)."""
    return tokenizer.decode([token], skip_special_tokens=False)
