"""`tunelab serve`: an OpenAI-compatible HTTP server (/v1/models, /v1/chat/completions, streamed or not).

One model, one generation at a time: requests wait their turn behind `ChatModel.lock`, so concurrent clients are
safe (they are answered one after the other). Streaming uses server-sent events like OpenAI's API: a worker thread
generates and pushes text pieces into a queue, the response reads them out as `data: {...}` chunks.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunelab.chat.engine import ChatModel
from tunelab.errors import TunelabError


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[str, list, None] = ""

    def text(self) -> str:
        """OpenAI also allows content as a list of parts: keep the text parts."""
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict) and p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, logprobs, ...) are accepted, unused
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def _settings_for(request: ChatRequest, defaults, limit: int):
    changes = {k: v for k, v in dict(
        max_new_tokens=request.max_completion_tokens or request.max_tokens, temperature=request.temperature,
        top_p=request.top_p, top_k=request.top_k, repetition_penalty=request.repetition_penalty, seed=request.seed,
    ).items() if v is not None}
    settings = dataclasses.replace(defaults, **changes)
    if settings.max_new_tokens > limit:
        raise HTTPException(400, f"max_tokens {settings.max_new_tokens} is above this server's limit of {limit}")
    return settings


def create_app(chat: ChatModel, defaults, *, max_tokens_limit: int = 4096, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `chat` with `defaults` (a GenerationSettings) for settings a request leaves out."""
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)
    app.state.chat = chat

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"invalid request: the body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", where or None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(TunelabError)
    async def _user_error(request: Request, exc: TunelabError):
        return _error(400, str(exc))

    if api_key:
        @app.middleware("http")
        async def _check_key(request: Request, call_next):
            if request.url.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
            return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0, "owned_by": "tunelab"}]}

    @app.get("/tunelab/info")
    def info():
        """What the web page shows: the template, the default system prompt and sampling settings."""
        return {"model": chat.name, "template": chat.template.name, "template_source": chat.template_source,
                "system": chat.system, "defaults": dataclasses.asdict(defaults)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        settings = _settings_for(request, defaults, max_tokens_limit)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        chat.template.render(chat.with_system(messages), add_generation_prompt=True)  # bad roles → 400 before work
        reply_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if request.stream:
            return StreamingResponse(_stream(chat, messages, settings, stop, reply_id),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = await run_in_threadpool(chat.reply, messages, settings, stop_words=stop)
        prompt_tokens, completion_tokens = _count_tokens(chat, messages, text)
        return {
            "id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": chat.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish_reason(completion_tokens, settings)}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    return app


def _count_tokens(chat: ChatModel, messages: list[dict], reply: str) -> tuple[int, int]:
    prompt = chat.template.render(chat.with_system(messages), add_generation_prompt=True)
    encode = lambda text: len(chat.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    return encode(prompt), encode(reply)


def _finish_reason(completion_tokens: int, settings) -> str:
    return "length" if completion_tokens >= settings.max_new_tokens else "stop"


_DONE = object()


def _stream(chat: ChatModel, messages, settings, stop, reply_id: str):
    """Server-sent events in OpenAI's chunk format; generation runs in a thread that feeds a queue."""
    pieces: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work():
        try:
            outcome["text"] = chat.reply(messages, settings, stop_words=stop, on_text=pieces.put)
        except Exception as exc:  # reported to the client as an error event, never a dead connection
            outcome["error"] = exc
        pieces.put(_DONE)

    threading.Thread(target=work, daemon=True, name="tunelab-generate").start()
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": chat.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while (piece := pieces.get()) is not _DONE:
        if piece:
            yield chunk({"content": piece})
    if "error" in outcome:
        yield f"data: {json.dumps({'error': {'message': str(outcome['error']), 'type': 'server_error'}})}\n\n"
    else:
        _, completion_tokens = _count_tokens(chat, messages, outcome["text"])
        yield chunk({}, _finish_reason(completion_tokens, settings))
    yield "data: [DONE]\n\n"


class BackgroundServer:
    """Run an app with uvicorn in a thread (tests, notebooks): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="tunelab-server")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(app: FastAPI, *, host: str, port: int, what: str = "OpenAI-compatible API") -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the model"
              f" (pass --api-key to require a key)", flush=True)
    print(f"{what} on http://{host}:{port}  (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
