"""Unstable Legion action payloads (legion-mesh §5): `cap`, `cm`, `tc`, with strict validators.

Pure: builds and checks JSON-ready dicts. Every inbound payload is checked against the guard rules
of the spec *and* explicit size limits (legion-mesh §6 item 11), raising `LegionError` with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from meshnode.errors import ProtocolError


class LegionError(ProtocolError):
    """An inbound cap / cm / tc payload breaks the guard rules or a size limit."""


MAX_NICK_CHARS = 64
MAX_MODEL_ID_CHARS = 256
MAX_SKILLS = 64
MAX_SKILL_CHARS = 128
MAX_SUMMARY_CHARS = 1024
MAX_TOOLS = 64
MAX_TOOL_NAME_CHARS = 128
MAX_TOOL_DESCRIPTION_CHARS = 4096
MAX_CALL_ID_CHARS = 128
MAX_CHAT_TEXT_CHARS = 16_384
MAX_ERROR_CHARS = 2048
MAX_PEER_ID_CHARS = 64
MAX_JSON_DEPTH = 16

ENGINE_RUN_MAX_TOKENS = 4096

ENGINE_RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["user"],
    "properties": {
        "system": {"type": "string"},
        "user": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": ENGINE_RUN_MAX_TOKENS},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                    "content": {"type": "string"},
                },
            },
        },
    },
    "additionalProperties": False,
}

CODEC_MAP_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

PING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"payload": {}},
    "additionalProperties": False,
}


def _depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a JSON value (iterative, so hostile nesting cannot blow the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _str(obj: dict[str, Any], key: str, limit: int, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise LegionError(f"{key} must be a string")
    if len(value) > limit:
        raise LegionError(f"{key} is longer than {limit} characters")
    return value


def _str_list(obj: dict[str, Any], key: str, *, required: bool) -> list[str] | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LegionError(f"{key} must be a list of strings")
    if len(value) > MAX_SKILLS or any(len(v) > MAX_SKILL_CHARS for v in value):
        raise LegionError(f"{key} exceeds {MAX_SKILLS} entries of {MAX_SKILL_CHARS} characters")
    return value


# --- cap -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cap:
    """A validated capability advertisement (the fields meshnode reads)."""

    nick: str
    model_id: str
    available: bool
    skills: list[str]
    tools: list[str]
    ts: float
    load: dict[str, int] | None
    raw: dict[str, Any]

    @property
    def is_meshnode(self) -> bool:
        return self.raw.get("agent") == "meshnode"

    @property
    def load_ratio(self) -> float:
        """(active + queued) / max from the optional `load` field; 0 when the peer sends none."""
        load = self.load or {"active": 0, "queued": 0, "max": 1}
        return (load["active"] + load["queued"]) / max(1, load["max"])


def tool_descriptor(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "description": description, "inputSchema": schema}


def build_cap(
    *,
    ts_ms: int,
    nick: str,
    model_id: str,
    available: bool,
    skills: list[str],
    system_prompt_summary: str,
    tools: list[dict[str, Any]],
    authoritative: list[str] | None = None,
    map_id: str | None = None,
    map_hash: str | None = None,
    load: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The cap meshnode sends (legion-mesh §5.3). Additive fields (mapId, mapHash, load, agent)
    are ignored by current browsers; stageHost is never sent."""
    cap: dict[str, Any] = {
        "v": 1,
        "ts": ts_ms,
        "nick": nick,
        "modelId": model_id,
        "available": available,
        "skills": list(skills),
        "systemPromptSummary": system_prompt_summary[:120],
        "tools": tools,
    }
    if authoritative:
        cap["authoritative"] = list(authoritative)
    if map_id:
        cap["mapId"] = map_id
    if map_hash:
        cap["mapHash"] = map_hash
    if load is not None:
        cap["load"] = dict(load)
    cap["agent"] = "meshnode"
    return cap


def parse_cap(payload: Any) -> Cap:
    """Apply the browser guard rules (legion-mesh §5.3) plus size limits."""
    if not isinstance(payload, dict):
        raise LegionError("cap must be an object")
    if _depth(payload) > MAX_JSON_DEPTH:
        raise LegionError("cap is nested too deeply")
    if payload.get("v") != 1:
        raise LegionError("cap.v must be 1")
    if not _is_number(payload.get("ts")):
        raise LegionError("cap.ts must be a number")
    nick = _str(payload, "nick", MAX_NICK_CHARS)
    model_id = _str(payload, "modelId", MAX_MODEL_ID_CHARS)
    if not isinstance(payload.get("available"), bool):
        raise LegionError("cap.available must be a boolean")
    skills = _str_list(payload, "skills", required=True)
    _str(payload, "systemPromptSummary", MAX_SUMMARY_CHARS)
    tools = payload.get("tools")
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise LegionError(f"cap.tools must be a list of at most {MAX_TOOLS}")
    names = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise LegionError("cap.tools entries must be objects")
        names.append(_str(tool, "name", MAX_TOOL_NAME_CHARS))
        _str(tool, "description", MAX_TOOL_DESCRIPTION_CHARS)
        schema = tool.get("inputSchema")
        if not isinstance(schema, dict):
            raise LegionError("cap.tools[].inputSchema must be an object")
    _str_list(payload, "authoritative", required=False)
    _str_list(payload, "delegating", required=False)
    load = payload.get("load")
    if load is not None:
        if not isinstance(load, dict) or not all(
            isinstance(load.get(k), int) and not isinstance(load.get(k), bool) and load[k] >= 0
            for k in ("active", "queued", "max")
        ):
            raise LegionError("cap.load must be {active, queued, max} non-negative integers")
        load = {k: int(load[k]) for k in ("active", "queued", "max")}
    return Cap(
        nick=str(nick),
        model_id=str(model_id),
        available=bool(payload["available"]),
        skills=list(skills or []),
        tools=[str(n) for n in names],
        ts=float(payload["ts"]),
        load=load,
        raw=payload,
    )


# --- cm --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    to: str
    body_kind: str
    text: str | None
    raw: dict[str, Any]


def build_chat(*, ts_ms: int, from_id: str, to: str, text: str) -> dict[str, Any]:
    return {"v": 1, "ts": ts_ms, "from": from_id, "to": to, "bodyKind": "text", "text": text}


def parse_chat(payload: Any) -> ChatMessage:
    """Validate `cm` (legion-mesh §5.4). `from` is ignored: the transport's peer id is the sender."""
    if not isinstance(payload, dict):
        raise LegionError("cm must be an object")
    if _depth(payload) > MAX_JSON_DEPTH:
        raise LegionError("cm is nested too deeply")
    if payload.get("v") != 1 or not _is_number(payload.get("ts")):
        raise LegionError("cm needs v=1 and a numeric ts")
    to = _str(payload, "to", MAX_PEER_ID_CHARS)
    kind = payload.get("bodyKind")
    if kind not in ("text", "tokens", "frame"):  # a tuple: hostile lists are unhashable (fuzz)
        raise LegionError("cm.bodyKind must be text, tokens or frame")
    text = None
    if kind == "text":
        text = _str(payload, "text", MAX_CHAT_TEXT_CHARS)
    return ChatMessage(to=str(to), body_kind=kind, text=text, raw=payload)


# --- tc --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    tool_name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    call_id: str
    status: str
    result: dict[str, Any] | None
    error: str | None


def parse_tool_frame(payload: Any) -> ToolCall | ToolResult:
    """Validate a `tc` frame (legion-mesh §5.6) into a call or a result."""
    if not isinstance(payload, dict):
        raise LegionError("tc must be an object")
    if _depth(payload) > MAX_JSON_DEPTH:
        raise LegionError("tc is nested too deeply")
    if payload.get("v") != 1 or not _is_number(payload.get("ts")):
        raise LegionError("tc needs v=1 and a numeric ts")
    call_id = _str(payload, "callId", MAX_CALL_ID_CHARS)
    if not call_id:
        raise LegionError("tc.callId must not be empty")
    kind = payload.get("kind")
    if kind == "call":
        name = _str(payload, "toolName", MAX_TOOL_NAME_CHARS)
        args = payload.get("args")
        if not isinstance(args, dict):
            raise LegionError("tc.args must be an object")
        return ToolCall(call_id=call_id, tool_name=str(name), args=args)
    if kind == "result":
        status = payload.get("status")
        if status not in ("ok", "error", "denied"):
            raise LegionError("tc.status must be ok, error or denied")
        result = payload.get("result")
        if result is not None and not isinstance(result, dict):
            raise LegionError("tc.result must be an object")
        error = _str(payload, "error", MAX_ERROR_CHARS, required=False)
        return ToolResult(call_id=call_id, status=status, result=result, error=error)
    raise LegionError("tc.kind must be call or result")


def build_call(*, ts_ms: int, call_id: str, tool_name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "call", "v": 1, "ts": ts_ms, "callId": call_id, "toolName": tool_name, "args": args}


def build_result(
    *, ts_ms: int, call_id: str, status: str, result: dict[str, Any] | None = None, error: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "result", "v": 1, "ts": ts_ms, "callId": call_id, "status": status}
    if result is not None:
        out["result"] = result
    if error is not None:
        out["error"] = error[:MAX_ERROR_CHARS]
    return out


# --- engine_run arguments --------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRunArgs:
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float | None
    top_p: float | None


def parse_engine_run(args: dict[str, Any], *, max_prompt_chars: int) -> EngineRunArgs:
    """Validate engine_run args against ENGINE_RUN_SCHEMA; LegionError carries the message."""
    allowed = set(ENGINE_RUN_SCHEMA["properties"])
    extra = sorted(set(args) - allowed)
    if extra:
        raise LegionError(f"unknown argument {extra[0]!r}")
    for key in ("max_tokens", "temperature", "top_p"):
        # JSON.stringify turns NaN and Infinity into null: a null here was meant as a number.
        if key in args and args[key] is None:
            raise LegionError(f"{key} is null: give a number or leave it out (NaN and Infinity arrive as null)")
    user = args.get("user")
    if not isinstance(user, str) or not user.strip():
        raise LegionError("user must be a non-empty string")
    system = args.get("system")
    if system is not None and not isinstance(system, str):
        raise LegionError("system must be a string")
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    history = args.get("messages")
    if history is not None:
        if not isinstance(history, list) or len(history) > 256:
            raise LegionError("messages must be a list of at most 256 messages")
        for i, msg in enumerate(history):
            if (
                not isinstance(msg, dict)
                or msg.get("role") not in ("system", "user", "assistant")
                or not isinstance(msg.get("content"), str)
            ):
                raise LegionError(f"messages[{i}] must be {{role: system|user|assistant, content: string}}")
            messages.append({"role": msg["role"], "content": msg["content"]})
    messages.append({"role": "user", "content": user})
    if sum(len(m["content"]) for m in messages) > max_prompt_chars:
        raise LegionError(f"prompt is longer than {max_prompt_chars} characters")
    max_tokens = args.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= ENGINE_RUN_MAX_TOKENS
    ):
        raise LegionError(f"max_tokens must be an integer in 1..{ENGINE_RUN_MAX_TOKENS}")
    temperature = args.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise LegionError("temperature must be a number in 0..2")
    top_p = args.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 <= top_p <= 1):
        raise LegionError("top_p must be a number in 0..1")
    return EngineRunArgs(
        messages=messages,
        max_tokens=max_tokens,
        temperature=None if temperature is None else float(temperature),
        top_p=None if top_p is None else float(top_p),
    )
