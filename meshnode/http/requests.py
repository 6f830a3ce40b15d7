"""Turning OpenAI-shaped request bodies into a prompt and sampling parameters.

`parse_request` validates a JSON body and returns the prompt (messages, text or token ids; the
backend tokenizes it off the event loop and enforces the token limits) and the sampling settings,
raising `RequestError` that names the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshnode.errors import MeshError
from meshnode.generation.api import Prompt


class RequestError(MeshError):
    """A request body is invalid; `field` names the offending key."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_body_chars: int = 1_000_000
    max_messages: int = 256
    max_stops: int = 8
    max_stop_chars: int = 256


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{key} must be a number", field=key)
    if not lo <= value <= hi:
        raise RequestError(f"{key} must be between {lo} and {hi}", field=key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str, lo: int, hi: int, default: int | None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer", field=key)
    if not lo <= value <= hi:
        raise RequestError(f"{key} must be between {lo} and {hi}", field=key)
    return value


def _stops(body: Mapping[str, Any], limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of them", field="stop")
    if len(stop) > limits.max_stops or any(len(s) > limits.max_stop_chars for s in stop):
        raise RequestError(
            f"stop allows at most {limits.max_stops} strings of {limits.max_stop_chars} characters",
            field="stop",
        )
    return tuple(stop)


def parse_messages(value: Any, limits: Limits, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError(f"{field} must be a non-empty list", field=field)
    if len(value) > limits.max_messages:
        raise RequestError(f"{field} allows at most {limits.max_messages} messages", field=field)
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RequestError(f"{field}[{i}] must be an object", field=field)
        role, content = msg.get("role"), msg.get("content")
        if role not in {"system", "user", "assistant", "tool"}:
            raise RequestError(f"{field}[{i}].role must be system, user, assistant or tool", field=field)
        if not isinstance(content, str):
            raise RequestError(f"{field}[{i}].content must be a string", field=field)
        out.append({"role": role, "content": content})
    return out


@dataclass(frozen=True, kw_only=True)
class ParsedRequest:
    prompt: Prompt
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    stream_format: str


def parse_request(body: Any, limits: Limits, *, chat: bool) -> ParsedRequest:
    """Validate an OpenAI-shaped completion (chat=False) or chat completion (chat=True) body."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    if chat:
        prompt = Prompt.chat(parse_messages(body.get("messages"), limits))
    else:
        given = body.get("prompt")
        if isinstance(given, str) and given:
            if len(given) > limits.max_body_chars:
                raise RequestError("prompt is too long", field="prompt")
            prompt = Prompt(text=given)
        elif isinstance(given, list) and given and all(isinstance(i, int) and not isinstance(i, bool) for i in given):
            prompt = Prompt(ids=tuple(given))
        else:
            raise RequestError("prompt must be a non-empty string or a non-empty list of token ids", field="prompt")
    stream_format = body.get("stream_format", "json")
    if stream_format not in {"json", "msgpack"}:
        raise RequestError("stream_format must be 'json' or 'msgpack'", field="stream_format")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError("only n=1 is supported", field="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", field="stream")
    max_tokens = _integer(body, "max_tokens", 1, limits.max_tokens, None)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", 1, limits.max_tokens, None)
    seed = _integer(body, "seed", 0, 2**63 - 1, None)
    return ParsedRequest(
        prompt=prompt,
        max_tokens=int(max_tokens or min(limits.default_max_tokens, limits.max_tokens)),
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=int(_integer(body, "top_k", 0, 1_000_000, 0) or 0),
        seed=seed,
        stop=_stops(body, limits),
        stream=stream or stream_format != "json",
        stream_format=stream_format,
    )
