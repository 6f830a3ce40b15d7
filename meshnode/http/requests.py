"""Turning OpenAI-shaped / engine_run requests into engine calls, shared by HTTP and the mesh.

`parse_request` validates a JSON body and returns the prompt ids and sampling parameters, raising
`RequestError` that names the offending field. `IncrementalText` turns a growing list of token ids
into text deltas without splitting multi-byte characters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from meshnode.errors import MeshError


class RequestError(MeshError):
    """A request body is invalid; `field` names the offending key."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TokenizingEngine(Protocol):
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_prompt_tokens: int = 4096
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
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    stream_format: str


def parse_request(
    body: Any, engine: TokenizingEngine, limits: Limits, *, chat: bool, vocab_size: int
) -> ParsedRequest:
    """Validate an OpenAI-shaped completion (chat=False) or chat completion (chat=True) body."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    if chat:
        prompt_ids = engine.encode_chat(parse_messages(body.get("messages"), limits))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            if len(prompt) > limits.max_body_chars:
                raise RequestError("prompt is too long", field="prompt")
            prompt_ids = engine.encode_text(prompt)
        elif isinstance(prompt, list) and prompt and all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt
        ):
            if any(not 0 <= i < vocab_size for i in prompt):
                raise RequestError(f"prompt token ids must be in [0, {vocab_size})", field="prompt")
            prompt_ids = list(prompt)
        else:
            raise RequestError("prompt must be a string or a non-empty list of token ids", field="prompt")
    if not prompt_ids:
        raise RequestError("prompt is empty", field="messages" if chat else "prompt")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise RequestError(
            f"prompt has {len(prompt_ids)} tokens; the limit is {limits.max_prompt_tokens}",
            field="messages" if chat else "prompt",
        )
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
        prompt_ids=prompt_ids,
        max_tokens=int(max_tokens or min(limits.default_max_tokens, limits.max_tokens)),
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=int(_integer(body, "top_k", 0, 1_000_000, 0) or 0),
        seed=seed,
        stop=_stops(body, limits),
        stream=stream or stream_format != "json",
        stream_format=stream_format,
    )


class IncrementalText:
    """Decode a growing id list into text deltas; never emits half of a multi-byte character."""

    def __init__(self, engine: TokenizingEngine) -> None:
        self._engine = engine
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""

    def push(self, ids: list[int], *, final: bool = False) -> str:
        self._ids.extend(ids)
        text = self._engine.decode(self._ids)
        # A trailing U+FFFD means an incomplete UTF-8 sequence: wait for the next ids.
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted :]
        self._emitted = len(text)
        self.text = text
        return delta
