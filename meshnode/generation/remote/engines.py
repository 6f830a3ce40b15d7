"""Plain engine servers that stream token ids: vLLM, SGLang ``/generate``, llama.cpp ``/completion``.

Fields and their sources are in docs/engines.md (from /work/notes/engines-research.md). None of
these servers serves a Codec map, so a local tokenizer (``--tokenizer``) supplies the map and the
text; the node encodes each id batch as its own Codec frames. Caveats handled here:

* vLLM ignores ``return_token_ids`` before 0.10.2: a chunk with text and no ``token_ids`` is an
  error, never a silent gap. A trailing id equal to the int ``stop_reason`` (the matched stop
  token) is dropped, as local engines do not stream stop ids.
* SGLang streams ``output_ids`` cumulatively by default and as deltas with
  ``--incremental-streaming-output``; the mode is detected per chunk (cumulative when the list is
  as long as ``meta_info.completion_tokens``). Cancel is a closed stream plus ``/abort_request``.
* llama.cpp sends no partial for a token that ends inside a UTF-8 character, so the next partial's
  ``tokens`` misses ids (``tokens_predicted`` tells). With a local tokenizer the gap is repaired by
  re-tokenizing that partial's ``content`` (the text is right; the ids may differ from the model's).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from meshnode.errors import ProtocolError
from meshnode.generation.api import FinishReason, Prompt, SamplingParams
from meshnode.generation.remote.dialects import HttpCall, Piece, SseReader, error_text, id_list, json_event

__all__ = ["LlamaCppDialect", "SglangDialect", "VllmDialect"]

logger = logging.getLogger(__name__)

_OPENAI_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


class _SseParser:
    """Shared SSE plumbing: events in order, ``[DONE]`` noted, nothing after the finish."""

    dialect = "upstream"

    def __init__(self) -> None:
        self._sse = SseReader()
        self.finished = False

    def feed(self, data: bytes) -> list[Piece]:
        pieces: list[Piece] = []
        for event in self._sse.feed(data):
            if event.strip() == "[DONE]" or self.finished:
                continue
            obj = json_event(event, self.dialect)
            if "error" in obj:  # mid-stream failure: data: {"error": {...}} (then [DONE])
                self.finished = True
                pieces.append(Piece(finish="error", error=f"{self.dialect}: {error_text(obj)}"))
                continue
            piece = self.event(obj)
            if piece is not None:
                pieces.append(piece)
                self.finished = piece.finish is not None
        return pieces

    def close(self) -> list[Piece]:
        if not self.finished:
            raise ProtocolError(f"{self.dialect} closed the stream before it finished")
        return []

    def event(self, obj: dict[str, Any]) -> Piece | None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# vLLM: /v1/completions and /v1/chat/completions with return_token_ids
# --------------------------------------------------------------------------------------------------


class VllmParser(_SseParser):
    dialect = "vllm"

    def event(self, obj: dict[str, Any]) -> Piece | None:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise ProtocolError(f"vllm chunk has no choices: {str(obj)[:80]}")
        if not choices:
            return None  # the usage chunk (stream_options.include_usage)
        choice = choices[0]
        if not isinstance(choice, dict):
            raise ProtocolError("vllm choice is not an object")
        prompt_ids = obj.get("prompt_token_ids") or choice.get("prompt_token_ids")
        text = choice.get("text")
        if text is None and isinstance(choice.get("delta"), dict):
            text = choice["delta"].get("content")
        raw_ids = choice.get("token_ids")
        if raw_ids is None:
            if text:
                raise ProtocolError("vllm sent text without token_ids: the server ignores return_token_ids "
                                    "(it needs vLLM 0.10.2 or later)")
            raw_ids = []
        ids = id_list(raw_ids, "vllm token_ids")
        reason = choice.get("finish_reason")
        finish: FinishReason | None = None
        error = None
        matched: str | int | None = None
        if reason is not None:
            finish = _OPENAI_FINISH.get(str(reason), "error")
            error = None if finish != "error" else f"vllm finished with {reason!r}"
            matched = choice.get("stop_reason")
            if type(matched) is int and ids and ids[-1] == matched:
                ids = ids[:-1]  # the matched stop token: local engines do not stream it either
        prompt_tokens = len(prompt_ids) if isinstance(prompt_ids, list) else None
        return Piece(ids=ids, finish=finish, prompt_tokens=prompt_tokens, matched_stop=matched, error=error)


class VllmDialect:
    """vLLM's OpenAI server (``return_token_ids``, vLLM 0.10.2+)."""

    name = "vllm"
    chat_native = True
    serves_map = False
    health_path = "/health"
    content_type = "text/event-stream"
    discovery: tuple[str, Callable[[bytes], int | None]] | None = None  # --max-num-seqs is not exposed

    def request(self, prompt: Prompt, params: SamplingParams, rid: str, model: str | None) -> HttpCall:
        body: dict[str, Any] = {"model": model} if model else {}
        if prompt.messages is not None:
            path = "/v1/chat/completions"
            body.update(messages=[dict(m) for m in prompt.messages], max_completion_tokens=params.max_tokens)
        else:
            path = "/v1/completions"
            body.update(prompt=prompt.text if prompt.text is not None else list(prompt.ids or ()),
                        max_tokens=params.max_tokens)  # always sent: vLLM's default is 16
        body.update(stream=True, return_token_ids=True, request_id=rid, temperature=params.temperature,
                    top_p=params.top_p)
        if params.top_k:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.stop_ids:
            body["stop_token_ids"] = list(params.stop_ids)
        return HttpCall(path=path, body=body, headers={"Accept": "text/event-stream", "Accept-Encoding": "identity"})

    def parser(self, encode: Callable[[str], list[int]] | None) -> VllmParser:
        return VllmParser()

    def abort(self, rid: str) -> HttpCall | None:
        return None  # closing the connection aborts the request in the engine


# --------------------------------------------------------------------------------------------------
# SGLang: native /generate
# --------------------------------------------------------------------------------------------------


class SglangParser(_SseParser):
    dialect = "sglang"

    def __init__(self) -> None:
        super().__init__()
        self._all: list[int] = []

    def event(self, obj: dict[str, Any]) -> Piece | None:
        ids = id_list(obj.get("output_ids", []), "sglang output_ids")
        meta = obj.get("meta_info")
        if not isinstance(meta, dict):
            raise ProtocolError("sglang chunk has no meta_info")
        count = meta.get("completion_tokens")
        seen = len(self._all)
        prefix = ids[:seen] == self._all
        cumulative = (prefix and len(ids) == count) if type(count) is int else (prefix and seen > 0 and len(ids) > seen)
        delta = ids[seen:] if cumulative else ids
        self._all.extend(delta)
        prompt_tokens = meta.get("prompt_tokens") if type(meta.get("prompt_tokens")) is int else None
        finish, error, matched = _sglang_finish(meta.get("finish_reason"))
        if finish is not None and type(matched) is int and delta and delta[-1] == matched:
            delta = delta[:-1]
        return Piece(ids=delta, finish=finish, prompt_tokens=prompt_tokens, matched_stop=matched, error=error)


def _sglang_finish(reason: Any) -> tuple[FinishReason | None, str | None, str | int | None]:
    """``meta_info.finish_reason``: null while running, then ``{"type": stop|length|abort, ...}``."""
    if reason is None:
        return None, None, None
    if not isinstance(reason, Mapping):
        raise ProtocolError(f"sglang finish_reason is not an object: {reason!r}")
    kind = reason.get("type")
    matched = reason.get("matched")
    matched = matched if isinstance(matched, (str, int)) and not isinstance(matched, bool) else None
    if kind == "stop":
        return "stop", None, matched
    if kind == "length":
        return "length", None, None
    return "error", f"sglang finished with {kind!r}: {reason.get('message') or ''}".rstrip(": "), None


class SglangDialect:
    """SGLang's native ``/generate`` (ids in ``output_ids``; cancel with ``/abort_request``)."""

    name = "sglang"
    chat_native = False  # /generate takes text or ids: the chat template is applied here
    serves_map = False
    health_path = "/health"
    content_type = "text/event-stream"
    discovery: tuple[str, Callable[[bytes], int | None]] | None = ("/get_server_info", lambda body: _json_int(
        body, "max_running_requests"))

    def request(self, prompt: Prompt, params: SamplingParams, rid: str, model: str | None) -> HttpCall:
        sampling: dict[str, Any] = {"max_new_tokens": params.max_tokens, "temperature": params.temperature,
                                    "top_p": params.top_p, "top_k": params.top_k or -1}
        if params.stop:
            sampling["stop"] = list(params.stop)
        if params.stop_ids:
            sampling["stop_token_ids"] = list(params.stop_ids)
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed  # newer builds only (docs/engines.md)
        body: dict[str, Any] = {"rid": rid, "sampling_params": sampling, "stream": True}
        if prompt.text is not None:
            body["text"] = prompt.text
        else:
            body["input_ids"] = list(prompt.ids or ())
        return HttpCall(path="/generate", body=body, headers={"Accept-Encoding": "identity"})

    def parser(self, encode: Callable[[str], list[int]] | None) -> SglangParser:
        return SglangParser()

    def abort(self, rid: str) -> HttpCall | None:
        # A closed stream aborts only after ~2 s (create_abort_task sleeps): ask at once too.
        return HttpCall(path="/abort_request", body={"rid": rid})


# --------------------------------------------------------------------------------------------------
# llama.cpp: native /completion
# --------------------------------------------------------------------------------------------------


class LlamaCppParser(_SseParser):
    dialect = "llamacpp"

    def __init__(self, encode: Callable[[str], list[int]] | None) -> None:
        super().__init__()
        self._encode = encode
        self._predicted = 0
        self._gaps = 0

    def event(self, obj: dict[str, Any]) -> Piece | None:
        content = obj.get("content") or ""
        if not isinstance(content, str):
            raise ProtocolError("llamacpp content is not a string")
        if "tokens" not in obj and content:
            raise ProtocolError("llamacpp sent text without tokens: the server ignores return_tokens")
        ids = id_list(obj.get("tokens") or [], "llamacpp tokens")
        prompt_tokens = obj.get("tokens_evaluated") if type(obj.get("tokens_evaluated")) is int else None
        stop = obj.get("stop")
        predicted = obj.get("tokens_predicted")
        if stop is not True and type(predicted) is int:
            missing = predicted - self._predicted - len(ids)
            self._predicted = predicted
            if missing > 0:  # ids of a split UTF-8 character were never sent (docs/engines.md)
                ids = self._repair(ids, content, missing)
        if stop is not True:
            return Piece(ids=ids, prompt_tokens=prompt_tokens)
        stop_type = obj.get("stop_type")
        if stop_type == "limit":
            return Piece(ids=ids, finish="length", prompt_tokens=prompt_tokens)
        word = obj.get("stopping_word")
        matched = word if stop_type == "word" and isinstance(word, str) and word else None
        return Piece(ids=ids, finish="stop", prompt_tokens=prompt_tokens, matched_stop=matched)

    def _repair(self, ids: list[int], content: str, missing: int) -> list[int]:
        self._gaps += 1
        if self._encode is None:
            if self._gaps == 1:
                logger.warning("llama.cpp skipped %d id(s) of a split character; without --tokenizer the text "
                               "misses it", missing)
            return ids
        if self._gaps == 1:
            logger.warning("llama.cpp skipped %d id(s) of a split character: re-tokenized %r locally", missing,
                           content)
        return self._encode(content)


class LlamaCppDialect:
    """llama.cpp ``llama-server``'s native ``/completion`` with ``return_tokens``."""

    name = "llamacpp"
    chat_native = False  # /v1/chat/completions streams no ids: the chat template is applied here
    serves_map = False
    health_path = "/health"
    content_type = "text/event-stream"
    discovery: tuple[str, Callable[[bytes], int | None]] | None = ("/props", lambda body: _json_int(
        body, "total_slots"))

    def request(self, prompt: Prompt, params: SamplingParams, rid: str, model: str | None) -> HttpCall:
        body: dict[str, Any] = {
            "prompt": prompt.text if prompt.text is not None else list(prompt.ids or ()),
            "n_predict": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "min_p": 0.0,  # llama.cpp's min_p default (0.05) is not ours
            "seed": -1 if params.seed is None else params.seed,
            "stream": True, "return_tokens": True, "cache_prompt": True,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        return HttpCall(path="/completion", body=body, headers={"Accept-Encoding": "identity"})

    def parser(self, encode: Callable[[str], list[int]] | None) -> LlamaCppParser:
        return LlamaCppParser(encode)

    def abort(self, rid: str) -> HttpCall | None:
        return None  # a closed connection cancels the slot's task


def _json_int(body: bytes, key: str) -> int | None:
    """A positive int at ``key`` of a JSON object (discovery endpoints), else None."""
    try:
        value = json.loads(body).get(key)
    except (ValueError, AttributeError):
        return None
    return value if type(value) is int and value > 0 else None
