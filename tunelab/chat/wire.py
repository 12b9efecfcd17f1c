"""OpenAI's wire format where /v1/chat/completions and /v1/completions share it: the error shape, a job's outcome
awaited while watching for the client to leave, the usage of a reply."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse

from tunelab.chat.batcher import Reply, ServerStopping


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape, as a response's body or a stream's error event."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    message = message.encode("utf-8", "backslashreplace").decode()  # a lone surrogate quoted back must not fail here
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))


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


def reply_usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def token_text(tokenizer, token: int) -> str:
    """A token as logprobs show it: its own text (a piece of a character that needs the next token shows as U+FFFD)."""
    return tokenizer.decode([token], skip_special_tokens=False)
