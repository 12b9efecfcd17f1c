"""What a request may hold: the OpenAI request bodies as pydantic models (`ChatRequest`, `Message`,
`CompletionRequest`), their text checked to be valid Unicode, and their sampling values over the server's defaults
(`settings_for`). A bad value is a `RequestError`, which the server (`tunelab.chat.server`) answers with HTTP 400
naming the parameter.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from tunelab.data.formats import message_role
from tunelab.errors import TunelabError
from tunelab.model.generate import SettingError, check_settings

NOT_UNICODE = "not valid Unicode text (it holds a lone surrogate such as \\ud800): send the text as UTF-8"
"""What a request hears about a string that no tokenizer can read: JSON allows a lone "\\ud800" escape, UTF-8 does
not. The same words for every field (pydantic's own check catches it in `stop`, `lone_surrogate` everywhere else)."""


def lone_surrogate(value) -> str | None:
    """Where in `value` (text, or lists and dicts holding text, at any depth) the first string that is not valid
    Unicode is: "" for `value` itself, "[1].text" for a part of it; None where all of it is valid."""
    todo = [("", value)]
    while todo:
        at, item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return at.encode("utf-8", "backslashreplace").decode()  # a key may be the text at fault
        elif isinstance(item, (dict, list)):
            pairs = list(item.items() if isinstance(item, dict) else enumerate(item))
            for key, inner in reversed(pairs):  # the first one first
                place = f"{at}[{key}]" if isinstance(key, int) else f"{at}.{key}"
                todo += [(place, inner), (place, key)] if isinstance(key, str) else [(place, inner)]
    return None


def valid_text(value):
    """An after-validator: the field's text (at any depth) must be valid Unicode, or it is a 400 naming where."""
    at = lone_surrogate(value)
    if at is not None:
        raise PydanticCustomError("string_unicode", NOT_UNICODE, {"at": at})
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[str, list, None] = ""
    """Text, or OpenAI content parts: text, and for a LLaVA model image_url parts with data URLs."""
    tool_calls: Optional[list] = None
    """An assistant's earlier calls (OpenAI shape, arguments as a JSON string)."""
    tool_call_id: Optional[str] = None
    name: Optional[str] = None
    """A tool result's call id and function name."""
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    """An assistant's earlier reasoning under either name (`reasoning`: newer vLLM's), or both as the server sends
    it: the same text, else a 400 (`tools.request_messages`)."""

    _text = field_validator("content", "tool_calls", "tool_call_id", "name", "reasoning_content", "reasoning")(
        valid_text)

    @field_validator("role", mode="before")
    @classmethod
    def _system_alias(cls, value):
        """OpenAI's clients send the system prompt of newer models as 'developer': it is a system message wherever
        training data reads one as such (`message_role`), so a model answers it as it was trained to."""
        return "system" if isinstance(value, str) and message_role(value) == "system" else value

    @field_validator("content", mode="before")
    @classmethod
    def _content_type(cls, value):
        if value is not None and not isinstance(value, (str, list)):
            raise PydanticCustomError("content_type", "should be a string or a list of content parts")
        return value


StopWord = Annotated[str, StringConstraints(min_length=1)]
Number = Annotated[float, Field(strict=True)]
"""A JSON number (an integer too), never a string or true / false."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False
    """OpenAI's switch: a last chunk holding the usage (and empty choices), every other chunk "usage": null."""


class SamplingRequest(BaseModel):
    """What /v1/chat/completions and /v1/completions share: the sampling settings, the stop rules, streaming."""
    # unknown OpenAI fields (user, metadata, ...) are accepted, unused; NaN / Infinity are refused
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: Optional[str] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    # numbers must be JSON numbers: true is not 1, "5" is not 5 (and an integer field takes no 5.0)
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None
    repetition_penalty: Optional[Number] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Number]] = None
    """Token id (as a string, as OpenAI's clients send it) -> a value from -100 to 100 added to its logit."""
    seed: Optional[StrictInt] = None
    stop: Optional[Annotated[list[StopWord], Field(max_length=16)]] = None
    n: StrictInt = Field(1, ge=1, le=128)
    """Replies to the request (OpenAI's choices), decoded together; seeded ones each from their own seed."""
    ignore_eos: StrictBool = False
    """vLLM's extension: generate until max_tokens or a `stop` string, past EOS and the template's stop words."""
    response_format: Optional[dict] = None
    """{"type": "text"} (any text), {"type": "json_object"} (a JSON object) or {"type": "json_schema", "json_schema":
    {"name": NAME, "schema": {...}, "strict": true}} (JSON valid for that schema): `tunelab.chat.grammar`."""

    _format_text = field_validator("response_format")(valid_text)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk holding the usage (`stream_options.include_usage`)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, value):
        if value is not None:
            at, problem = response_format_problem(value)
            if problem:
                raise PydanticCustomError("response_format", problem, {"at": at})
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_word(cls, value):
        return [value] if isinstance(value, str) else value


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    """True: the reply's tokens come with their log-probabilities (`choices[0].logprobs.content`)."""
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    """With `logprobs`: how many of the most likely tokens each position lists too (OpenAI allows 0 to 20)."""
    tools: Optional[list] = None
    """Function definitions, rendered into the prompt as the chat template writes them."""
    tool_choice: Union[Literal["auto", "none", "required"], dict, None] = None
    """'auto' (the model chooses), 'none' (the tools stay out of the prompt), 'required' (a call to any of them) or
    {"type": "function", "function": {"name": NAME}} (a call to that one): `tunelab.chat.tools.choose`."""
    parallel_tool_calls: Optional[StrictBool] = None
    """False: a reply's first call alone is sent (null or true: every call)."""

    _text = field_validator("tools", "tool_choice")(valid_text)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value):
        named = isinstance(value, dict) and value.get("type") == "function" and \
            isinstance(value.get("function"), dict) and isinstance(value["function"].get("name"), str) and \
            value["function"]["name"] != ""
        if value is not None and value not in ("auto", "none", "required") and not named:
            raise PydanticCustomError("tool_choice", "should be 'auto' (the model chooses), 'none' (no tools), "
                                                     "'required' (a call to any tool) or {\"type\": \"function\", "
                                                     "\"function\": {\"name\": NAME}} (a call to that one)")
        return value


class CompletionRequest(SamplingRequest):
    """OpenAI's (legacy) text completion: a prompt continued as it is, no chat template."""
    prompt: Union[str, list]
    """A text, a list of texts, a list of token ids, or a list of such lists: one choice for each prompt."""
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    """The reply's tokens' log-probabilities, with this many likeliest tokens at each place (OpenAI allows up to 5,
    vLLM 20)."""
    echo: StrictBool = False
    """The prompt's text before the reply's."""
    suffix: Optional[str] = None
    best_of: Optional[StrictInt] = None

    _text = field_validator("prompt", "suffix")(valid_text)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        def token_ids(item):
            return isinstance(item, list) and all(type(t) is int for t in item)
        if isinstance(value, str) or (isinstance(value, list) and value and (
                all(isinstance(p, str) for p in value) or token_ids(value) or all(token_ids(p) for p in value))):
            return value
        raise PydanticCustomError("prompt", "should be a text, a list of texts, a list of token ids or a list of "
                                            "lists of token ids")


RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_SHAPES = ('{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": NAME, '
           '"schema": {...}}}')


def response_format_problem(value) -> tuple[str, str | None]:
    """(where in the field, what is wrong) with a `response_format`, as OpenAI's API takes it; None: nothing."""
    if not isinstance(value, dict):
        return "", f"should be an object: {_SHAPES}"
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        return ".type", f"{shown(kind)} is none of {', '.join(map(repr, RESPONSE_FORMATS))}: send {_SHAPES}"
    if kind != "json_schema":
        return "", None
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        return ".json_schema", 'type "json_schema" needs json_schema: {"name": NAME, "schema": {...}, "strict": true}'
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        return ".json_schema.name", "should be the schema's name, a non-empty string (OpenAI's API needs one too)"
    if not isinstance(spec.get("schema"), dict):
        return ".json_schema.schema", "should be the JSON schema the reply must follow, an object"
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        return ".json_schema.strict", f"{shown(spec['strict'])} should be true or false"
    return "", None


# request field → GenerationSettings field
FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
          "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias", "seed": "seed"}


def shown(value, most: int = 60) -> str:
    """A bad value quoted back as JSON writes it (true, "5"), cut short: a request's text may be long."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= most else text[:most] + "..."


def field_path(loc) -> str:
    """A validation error's place as the request spells it: messages[0].content, not messages.0.content."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


class RequestError(TunelabError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def settings_for(request: SamplingRequest, defaults, limit: int, vocab_size: int):
    """(settings, max_tokens asked for explicitly): the request's values over the server's defaults, checked.
    `vocab_size`: the tokenizer's, the token ids `logit_bias` may name."""
    by_new_name = getattr(request, "max_completion_tokens", None)  # chat's newer name for max_tokens
    asked = by_new_name if by_new_name is not None else request.max_tokens
    values = {FIELDS[k]: getattr(request, k) for k in FIELDS if k != "max_tokens" and getattr(request, k) is not None}
    if request.logit_bias is not None:
        values["logit_bias"] = _token_biases(request.logit_bias, vocab_size) or None
    if asked is not None:
        values["max_new_tokens"] = asked
    settings = dataclasses.replace(defaults, **values)
    names = {v: k for k, v in FIELDS.items()}
    if by_new_name is not None:
        names["max_new_tokens"] = "max_completion_tokens"
    try:
        check_settings(settings, names)
    except SettingError as exc:
        raise RequestError(str(exc), exc.name) from None
    if asked is not None and asked > limit:
        name = names["max_new_tokens"]
        raise RequestError(f"{name} {asked}: above this server's limit of {limit} (--max-tokens-limit).", name)
    return settings, asked is not None


def check_token_ids(tokens, vocab_size: int, where: str, param: str) -> None:
    """A RequestError naming the first of `tokens` (ids, or `logit_bias`'s keys as sent: strings) that is no token id
    of a tokenizer of `vocab_size` tokens: an id past the logits would fail the step of every request decoding beside
    it."""
    for token in tokens:
        try:
            known = 0 <= int(token) < vocab_size
        except ValueError:
            known = False
        if not known:
            raise RequestError(f"{where}: {shown(token)} is not a token id of this model's tokenizer (0 to "
                               f"{vocab_size - 1}).", param)


def _token_biases(logit_bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """`logit_bias` with its keys as token ids, each checked to be one of the tokenizer's."""
    check_token_ids(logit_bias, vocab_size, "logit_bias", "logit_bias")
    return {int(key): float(bias) for key, bias in logit_bias.items()}


def logprobs_asked(request: ChatRequest) -> int | None:
    """None, or how many most likely tokens each reply token lists beside its own log-probability."""
    if not request.logprobs:
        if request.top_logprobs is not None:
            raise RequestError("top_logprobs: needs logprobs: true (it says how many alternatives each token of the "
                               "logprobs lists).", "top_logprobs")
        return None
    return request.top_logprobs or 0
