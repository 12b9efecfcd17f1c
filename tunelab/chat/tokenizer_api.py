"""`tunelab serve`'s tokenizer endpoints, as vLLM's server has them: `POST /tokenize` (a text, or messages as the
chat template writes them for a reply: the very prompt /v1/chat/completions would run), `POST /detokenize` and
`GET /tokenizer_info` (the special tokens and the training chat template). A client counts tokens without a copy of
the tokenizer, and lm-evaluation-harness's `local-completions` finds them and tokenises through the server (its
"remote" tokenizer) instead of needing the model's folder.
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from starlette.concurrency import run_in_threadpool

from tunelab.chat.engine import ChatModel
from tunelab.chat.requests import Message, RequestError, check_token_ids, valid_text
from tunelab.chat.tools import request_messages


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = Field(None, min_length=1)
    add_special_tokens: StrictBool = True
    """For a `prompt`: the tokenizer's special tokens (Llama's BOS) as /v1/completions adds them."""

    _text = field_validator("prompt")(valid_text)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[StrictInt]


def add_tokenizer_routes(app: FastAPI, chat: ChatModel) -> None:
    tokenizer = chat.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("send either prompt (a text) or messages (a conversation, tokenised as the chat "
                               "template writes it for a reply).", "prompt" if body.prompt is None else "messages")
        if body.prompt is not None:
            ids = await run_in_threadpool(lambda: tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)[
                "input_ids"])
        else:
            messages = request_messages([m.model_dump(exclude_none=True) for m in body.messages])
            ids = (await run_in_threadpool(chat.prompt, messages))[0]
        return {"count": len(ids), "max_model_len": chat.max_model_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_token_ids(body.tokens, len(tokenizer), "tokens", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    def tokenizer_info():
        # without its last newline, which transformers drops when it renders and a client's Jinja may keep
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "model_max_length": chat.max_model_len, "chat_template": chat.template.to_jinja().removesuffix("\n")}
