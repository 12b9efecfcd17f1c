"""`tunelab serve`: an OpenAI-compatible HTTP server (/v1/models, /v1/chat/completions, streamed or not).

Requests are decoded together by the engine's continuous batching (`tunelab.chat.batcher`): each one keeps its own
sampling settings and streams its own tokens. The event loop never generates: it validates, tokenizes in a thread,
hands a `Job` to the worker and relays what the worker reports (through `call_soon_threadsafe`).

Limits: every sampling setting is checked against `tunelab.model.generate.RULES`, prompt + max_tokens against the
model's context (`ChatModel.fit_reply`), max_tokens against --max-tokens-limit; each refusal is HTTP 400 in OpenAI's
error shape naming the parameter. A client that goes away (closed stream, or a timed-out plain request) cancels its
job at the worker's next step. SIGTERM / Ctrl-C finishes every job at once, so the server stops promptly.
A reasoning model's reply (`ChatModel.reasoning`) comes as its reasoning (under both `reasoning_content` and
`reasoning`, `tunelab.chat.reasoning.WIRE_NAMES`) and its answer (`tunelab.chat.reasoning`). A `response_format` and a
forced call's arguments are held to their JSON schema by a grammar (`tunelab.chat.grammar`), compiled in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunelab.chat.completions import completion_route
from tunelab.chat.engine import ChatModel
from tunelab.chat.grammar import constrains, reply_constraint
from tunelab.chat.jobs import Reply
from tunelab.chat.logprobs import TokenLogprob
from tunelab.chat.reasoning import REASONING, WIRE_NAMES, ReasoningStream, on_the_wire, split_reasoning
from tunelab.chat.requests import (NOT_UNICODE, ChatRequest, RequestError, field_path, logprobs_asked, settings_for,
                                   shown)
from tunelab.chat.tokenizer_api import add_tokenizer_routes
from tunelab.chat.free_form import function_tools, refuse_free_form
from tunelab.chat.tools import (ToolChoice, call_format, choose, offered_format, request_messages, request_tools,
                                split_calls)
from tunelab.chat.wire import (DONE, error_event, error_response, event, event_stream, replies_usage, reporter,
                               sample_settings, submit_all, token_text, wait_for_all)
from tunelab.data.templates import templates_writing_tool_calls, tool_support
from tunelab.errors import TunelabError

OPEN_PATHS = {"/health"}
"""Paths answered without the API key: a liveness probe that tells nothing (and the web page, which asks for it)."""


class JsonBodies:
    """Read every POST body as JSON, whatever its Content-Type says: `curl -d '{...}'` sends one as
    application/x-www-form-urlencoded, and OpenAI's API reads it as JSON all the same."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            declared = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            if not (declared == b"application/json" or declared.endswith(b"+json")):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


@contextlib.contextmanager
def _blaming(param: str):
    """A TunelabError inside (bad content parts, a template that cannot render the messages) is a 400 whose `param`
    is this request field, unless it names one itself."""
    try:
        yield
    except TunelabError as exc:
        if getattr(exc, "param", None) is None:
            raise RequestError(str(exc), param, getattr(exc, "status", 400)) from None
        raise


def create_app(chat: ChatModel, defaults, *, max_tokens_limit: int = 4096, api_key: str | None = None,
               open_paths=(), stop_words=()) -> FastAPI:
    """The FastAPI app serving `chat` with `defaults` (a GenerationSettings) for settings a request leaves out, and
    `stop_words` (--stop-word) for a request without `stop`.
    With `api_key`, every path but /health and `open_paths` needs 'Authorization: Bearer KEY'."""
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)
    app.add_middleware(JsonBodies)
    app.state.chat = chat
    # the limit bounds every reply: one whose request leaves max_tokens out too (--max-new-tokens 512 is the default)
    defaults = dataclasses.replace(defaults, max_new_tokens=min(defaults.max_new_tokens, max_tokens_limit))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            reason = first.get('ctx', {}).get('error', '')
            return error_response(400, f"invalid request: the body is not valid JSON ({reason}): send a JSON object, "
                                       f"with the header 'Content-Type: application/json'")
        loc = [p for p in first.get("loc", ()) if p != "body"]
        if not loc:  # the body itself (never quoted back: it may be large, or hold anything)
            return error_response(400, 'invalid request: the body should be a JSON object, e.g. {"messages": '
                                       '[{"role": "user", "content": "Hi"}]}')
        value = f" {shown(first['input'])}" if not isinstance(first.get("input", {}), (dict, list)) else ""
        text = first.get("msg", "malformed")
        if first.get("type") == "string_unicode":  # one message for a lone surrogate, wherever it is
            value, text = "", NOT_UNICODE
        where = field_path(loc) + first.get("ctx", {}).get("at", "")
        message = f"invalid request: {where or 'body'}{value}: {text}"
        return error_response(400, message, str(loc[0]) if loc else None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(TunelabError)
    async def _user_error(request: Request, exc: TunelabError):
        return error_response(getattr(exc, "status", 400), str(exc), getattr(exc, "param", None))

    if api_key:
        expected = f"Bearer {api_key}".encode()
        free = OPEN_PATHS | set(open_paths)

        @app.middleware("http")
        async def _check_key(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path not in free and not secrets.compare_digest(given, expected):
                return error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                           "with the key given to --api-key")
            return await call_next(request)

    app.post("/v1/completions")(completion_route(chat, defaults, max_tokens_limit=max_tokens_limit,
                                                 stop_words=stop_words))
    add_tokenizer_routes(app, chat)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0, "owned_by": "tunelab",
                                            "max_model_len": chat.max_model_len}]}

    @app.get("/tunelab/info")
    def info():
        """What the web page shows: the template, the default system prompt and sampling settings, the limits."""
        return {"model": chat.name, "template": chat.template.name, "template_source": chat.template_source,
                "system": chat.system, "defaults": dataclasses.asdict(defaults), "max_model_len": chat.max_model_len,
                "max_tokens_limit": max_tokens_limit, "max_batch_size": chat.batcher.max_batch_size,
                "images": chat.vision is not None}

    @functools.cache
    def support():
        """What the template does with tools: probe renderings, made once, on the first request that needs them (the
        template never changes)."""
        return tool_support(chat.template)

    @functools.cache
    def template_tools():
        """(whether the template writes tools, how it writes a call)."""
        return support().definitions, call_format(chat.template)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        settings, asked = settings_for(body, defaults, max_tokens_limit, len(chat.tokenizer))
        logprobs = logprobs_asked(body)
        with _blaming("messages"):
            messages = request_messages([m.model_dump(exclude_none=True) for m in body.messages])
        calling = next((i for i, m in enumerate(messages) if m.get("tool_calls")), None)
        if calling is not None and not support().calls:
            raise RequestError(f"messages[{calling}].tool_calls: the chat template {chat.template.name!r} has no place "
                               f"for tool calls, so the model would never see them: serve with a template that writes "
                               f"them ({', '.join(templates_writing_tool_calls())}), or send the calls and their "
                               f"results as text.", "messages")
        several = next((i for i, m in enumerate(messages) if len(m.get("tool_calls", [])) > 1), None)
        if several is not None and not support().several_calls:  # GLM-4 would show the model the first call alone
            raise RequestError(f"messages[{several}].tool_calls holds {len(messages[several]['tool_calls'])} calls, "
                               f"and the chat template {chat.template.name!r} writes one call per reply: send them as "
                               f"replies of one call, each followed by its result.", "messages")
        with _blaming("tools"):
            offered = request_tools(body.tools)
        if body.tool_choice == "none":
            offered = None
        if offered and not template_tools()[0]:
            raise RequestError(f"the chat template {chat.template.name!r} has no place for tools, so the model would "
                               f"never see them: serve with a template that writes them "
                               f"({', '.join(templates_writing_tool_calls())}), or leave tools out.", "tools")
        refuse_free_form(messages, offered, support())
        calls_in_reply = offered_format(template_tools()[1], offered) if offered else None
        # "required" or a named function: the reply is started as a call in the prompt, and the model goes on (a
        # function's call: a free-form tool's is the model's choice)
        functions = function_tools(offered)
        choice = choose(body.tool_choice, functions, calls_in_reply, chat.template.name,
                        parallel=body.parallel_tool_calls is not False)
        stop = list(stop_words if body.stop is None else body.stop)
        constraint = None
        if constrains(body.response_format, choice):  # a new schema takes a while to compile: not on the event loop
            constraint = await run_in_threadpool(reply_constraint, chat, body.response_format, choice, functions,
                                                 calls_in_reply)
        # a long prompt (or its images) must not hold up the event loop
        with _blaming("messages"):
            prompt_ids, pixel_values = await run_in_threadpool(chat.prompt, messages, tools=offered,
                                                               reply_start=choice.start)
        settings.max_new_tokens = chat.fit_reply(len(prompt_ids), settings.max_new_tokens, asked=asked)
        events: asyncio.Queue = asyncio.Queue()
        report = reporter(events)
        # a reply that may hold calls is read whole, then sent as calls or text (streamed as one chunk), but for its
        # reasoning, streamed as it comes (a reply started as a call has none)
        streamed = body.stream and (calls_in_reply is None or (chat.reasoning is not None and not choice.start))
        jobs = [chat.job(prompt_ids, each, stop_words=stop, ignore_eos=body.ignore_eos,
                         on_text=report(i) if streamed else None, on_done=report(i), pixel_values=pixel_values,
                         logprobs=logprobs, constraint=constraint)
                for i, each in enumerate(sample_settings(settings, body.n))]  # `n` replies, each its own sampling
        submit_all(chat, jobs)
        reply_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return event_stream(_stream(chat, jobs, events, reply_id, calls_in_reply, chat.reasoning,
                                        body.include_usage, choice))
        replies = await wait_for_all(jobs, events, request)
        if not isinstance(replies, list):
            return replies  # the client left, or a reply failed
        choices = []
        for i, (job, reply) in enumerate(zip(jobs, replies)):
            message, finish = _reply_message(reply, calls_in_reply, chat.reasoning, choice)  # or a RequestError
            kept = _logprobs(chat.tokenizer, job.token_logprobs) if logprobs is not None else None
            choices.append({"index": i, "message": {"role": "assistant", **message}, "finish_reason": finish,
                            "logprobs": kept})
        return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": chat.name,
                "choices": choices, "usage": replies_usage(replies)}

    return app


def _reply_message(reply: Reply, calls_in_reply, thinking=None, choice: ToolChoice = ToolChoice()) -> tuple[dict, str]:
    """(the reply as an OpenAI message without its role, finish_reason): the reasoning apart where the template
    writes some (`thinking`, a ReasoningFormat; the answer None when there is none, as vLLM sends it), tool calls
    split out of the answer where offered, those `choice` keeps. A reply `choice` started as a call is read with its
    start; one that is no call after all is a RequestError (`ToolChoice.missed`)."""
    text = choice.start + reply.text
    reasoning, text = split_reasoning(text, thinking)
    thought = on_the_wire({REASONING: reasoning}) if reasoning else {}
    text, calls = split_calls(text, calls_in_reply) if calls_in_reply is not None else (text, [])
    calls = choice.keep(calls)
    if choice.start and not calls:
        raise choice.missed(reply)
    if calls:  # OpenAI's finish_reason (and vLLM's): "stop" for a call to the function tool_choice names
        return {"content": text or None, "tool_calls": calls, **thought}, "stop" if choice.name else "tool_calls"
    return {"content": text if reasoning is None else text or None, **thought}, reply.finish_reason


def _logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """OpenAI's `logprobs` of a chat choice: each token as its text, log-probability and UTF-8 bytes, with its
    alternatives."""
    def described(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {"content": [dict(described(e.token, e.logprob), top_logprobs=[described(*t) for t in e.top])
                        for e in entries], "refusal": None}


def _delta(delta: dict, calls_in_reply) -> dict:
    """A streamed piece's non-empty texts, the reasoning under each of its names; not the answer where it may hold
    calls (it is sent whole at the end)."""
    return on_the_wire({k: v for k, v in delta.items() if v and not (k == "content" and calls_in_reply is not None)})


async def _stream(chat: ChatModel, jobs: list, events: asyncio.Queue, reply_id: str, calls_in_reply=None,
                  thinking=None, include_usage: bool = False, choice: ToolChoice = ToolChoice()):
    """Server-sent events in OpenAI's chunk format, each reply (of `n`) under its `index`. If the client disconnects,
    starlette cancels this generator: `finally` cancels the jobs. With `calls_in_reply` a reply comes whole, as one
    chunk of text or calls. With `thinking` (a ReasoningFormat) the reasoning comes as deltas (`reasoning_content` and
    `reasoning`, the same text), then the answer as `content` (with `calls_in_reply`: the reasoning as it comes, the
    answer whole). With `include_usage` (the request's `stream_options`) a last chunk of empty choices holds the
    usage, as OpenAI sends it. `choice`: which calls are sent (a reply it started as a call and that is none is an
    error event)."""
    created = int(time.time())
    sent_logprobs = [0] * len(jobs)

    def chunk(i: int | None, delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> str:
        """A chunk of reply `i`'s `delta`, with the logprobs of its tokens generated since its last chunk where they
        were asked for; `i` None: the usage chunk, whose choices are empty."""
        choices = [] if i is None else [{"index": i, "delta": delta, "finish_reason": finish}]
        if choices and jobs[i].logprobs is not None:
            new = jobs[i].token_logprobs[sent_logprobs[i]:]
            sent_logprobs[i] += len(new)
            choices[0]["logprobs"] = _logprobs(chat.tokenizer, new)
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": chat.name,
                "choices": choices}
        if include_usage:  # OpenAI: every chunk has the field once it is asked for, null but in the last
            body["usage"] = usage
        return event(body)

    try:
        for i in range(len(jobs)):
            yield chunk(i, {"role": "assistant", "content": ""})
        splits = [ReasoningStream(thinking) if thinking else None for _ in jobs]
        replies = {}
        while len(replies) < len(jobs):
            i, item = await events.get()
            split = splits[i]
            if isinstance(item, str):
                if sent := _delta(split.feed(item) if split else {"content": item}, calls_in_reply):
                    yield chunk(i, sent)
                continue
            if not isinstance(item, Exception):
                if split and (sent := _delta(split.finish(), calls_in_reply)):
                    yield chunk(i, sent)
                if calls_in_reply is not None:
                    try:
                        message, finish = _reply_message(item, calls_in_reply, thinking, choice)
                    except RequestError as exc:  # a reply started as a call that is none
                        item = exc
            if isinstance(item, Exception):
                yield error_event(item)
                break
            if calls_in_reply is not None:
                for name in WIRE_NAMES:  # streamed already
                    message.pop(name, None)
                if "tool_calls" in message:
                    message["tool_calls"] = [dict(call, index=k) for k, call in enumerate(message["tool_calls"])]
                yield chunk(i, message)
                yield chunk(i, {}, finish)
            else:
                yield chunk(i, {}, item.finish_reason)
            replies[i] = item
        else:
            if include_usage:
                yield chunk(None, usage=replies_usage(list(replies.values())))
        yield DONE
    finally:
        for job in jobs:
            job.cancel()
