"""The token source: a real completion recorded once, replayed at a fixed token rate.

The bench measures transport, not the model, so the serving node replays the ids of one real
SmolLM2 completion (``bench/data/completion_smollm2.json``) at ``rate`` tokens per second per
stream. :func:`record_completion` makes that file with the embedded model (seeded sampling);
``--engine real`` runs the bench against the real engine instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshnode.errors import AdmissionError
from meshnode.generation.api import CodecMapInfo
from meshnode.generation.local import LocalBackend
from meshnode.generation.modelinfo import ModelInfo
from meshnode.wire.maps import map_bytes, map_sha256

if TYPE_CHECKING:
    from meshnode.generation.api import SamplingParams, TokenStream

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_PATH = Path(__file__).resolve().parents[2] / "bench" / "data" / "completion_smollm2.json"
RECORD_PROMPT = ("Explain in detail how a peer-to-peer network of browser tabs can share one language "
                 "model, covering discovery, signalling, data channels, relays and bandwidth.")
RECORD_SEED = 1234
RECORD_MAX_TOKENS = 500
RECORD_TEMPERATURE = 0.7


@dataclass(frozen=True)
class Completion:
    """A recorded completion: token ids and the text they decode to."""

    model_id: str
    ids: list[int]
    text: str
    prompt: str
    pieces: list[str]
    """The text each id adds (for the json-sse baseline's chunks)."""

    @classmethod
    def load(cls, path: Path = DEFAULT_COMPLETION_PATH) -> Completion:
        data = json.loads(Path(path).read_text())
        ids = [int(i) for i in data["ids"]]
        if not ids or any(i < 0 or i >= 2**32 for i in ids):
            raise ValueError(f"{path}: ids must be a non-empty list of uint32")
        pieces = [str(p) for p in data.get("pieces", [])]
        return cls(model_id=str(data["model_id"]), ids=ids, text=str(data.get("text", "")),
                   prompt=str(data.get("prompt", "")), pieces=pieces)


async def record_completion(path: Path = DEFAULT_COMPLETION_PATH, *, max_tokens: int = RECORD_MAX_TOKENS,
                            seed: int = RECORD_SEED) -> Completion:
    """Generate one seeded completion with the embedded model and write it to `path`.

    Sampling (T = 0.7, top-p 0.95) rather than greedy decoding, so the ids look like real chat
    output; ``min_tokens`` is not available, so the prompt asks for a long answer and the result
    is recorded whatever its length (the JSON says how many ids it has).
    """
    from meshnode.generation.api import SamplingParams
    from meshnode.generation.models import resolve_model
    from meshnode.generation.torch_backend import TorchEngine

    loaded = await asyncio.to_thread(resolve_model, None, device="cpu", progress=False)
    async with TorchEngine.from_loaded(loaded, max_tokens_limit=max_tokens) as engine:
        prompt_ids = engine.encode_chat([{"role": "user", "content": RECORD_PROMPT}])
        params = SamplingParams(temperature=RECORD_TEMPERATURE, top_p=0.95, seed=seed, max_tokens=max_tokens)
        ids: list[int] = []
        async with engine.generate(prompt_ids, params) as stream:
            async for chunk in stream:
                ids.extend(chunk.ids)
                if len(ids) // 50 != (len(ids) - len(chunk.ids)) // 50:
                    logger.info("recorded %d tokens so far", len(ids))
        text = engine.decode(ids)
        pieces, previous = [], ""
        for end in range(1, len(ids) + 1):  # the text each id adds, as an incremental detokenizer sees it
            current = engine.decode(ids[:end])
            pieces.append(current[len(previous):] if current.startswith(previous) else current)
            previous = current
        completion = Completion(model_id=engine.model_id, ids=ids, text=text, prompt=RECORD_PROMPT, pieces=pieces)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({
        "model_id": completion.model_id, "prompt": RECORD_PROMPT, "seed": seed, "temperature": RECORD_TEMPERATURE,
        "top_p": 0.95, "max_tokens": max_tokens, "tokens": len(ids), "ids": ids, "text": text, "pieces": pieces,
    }, indent=1) + "\n")
    logger.info("recorded %d tokens to %s", len(ids), path)
    return completion


class ReplayEngine:
    """A stand-in for :class:`meshnode.generation.engine.TorchEngine` that replays recorded ids.

    Every request streams the first ``tokens`` ids of the completion (capped by the request's
    ``max_tokens``) at ``rate`` tokens per second on a fixed schedule: token k is due at
    ``start + k / rate``. One ticker task serves all streams every ``tick_seconds`` and hands each
    stream the ids that are due (so a slow consumer never slows the source down, and hundreds of
    streams cost one timer, not one per token).

    Args:
        completion: The recorded completion.
        rate: Tokens per second per stream.
        max_concurrent: Streams that may run at once; more raise ``AdmissionError``.
        tokens: Ids per stream (default: the whole completion).
        tick_seconds: Scheduling granularity.
    """

    def __init__(self, completion: Completion, *, rate: float, max_concurrent: int = 4096,
                 tokens: int | None = None, tick_seconds: float = 0.01) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.completion = completion
        self.rate = rate
        self.max_concurrent = max_concurrent
        self.tokens = min(tokens or len(completion.ids), len(completion.ids))
        self.tick_seconds = tick_seconds
        self._streams: list[_Replay] = []
        self._ticker: asyncio.Task[None] | None = None
        self._next_id = 0
        self.tokenizer = None

    @property
    def model_id(self) -> str:
        return self.completion.model_id

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        # Any short prompt will do; only its length is checked by the service.
        return [1] * max(1, sum(len(str(m.get("content", ""))) for m in messages) // 4)

    def encode_text(self, text: str) -> list[int]:
        return [1] * max(1, len(text) // 4)

    def decode(self, ids: Sequence[int]) -> str:
        # The service puts this text in the engine_run tool result: make it as long as the real one.
        pieces = self.completion.pieces
        if pieces and list(ids) == self.completion.ids[:len(ids)]:
            return "".join(pieces[:len(ids)])
        return f"<{len(ids)} replayed tokens>"

    def load_info(self) -> dict[str, int]:
        return {"active": len(self._streams), "queued": 0, "max_concurrent": self.max_concurrent, "max_queue": 0}

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> TokenStream:
        from meshnode.generation.api import SamplingParams, TokenStream

        if len(self._streams) >= self.max_concurrent:
            raise AdmissionError(f"busy: {len(self._streams)} replay streams running")
        params = params or SamplingParams()
        count = min(self.tokens, params.max_tokens)
        self._next_id += 1
        stream = TokenStream(request_id=self._next_id, prompt_tokens=len(prompt_ids),
                             loop=asyncio.get_running_loop())
        self._streams.append(_Replay(stream=stream, ids=self.completion.ids[:count], start=time.monotonic()))
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="replay.ticker")
        return stream

    async def _tick(self) -> None:
        while self._streams:
            now = time.monotonic()
            for replay in list(self._streams):
                if replay.stream.cancelled:
                    self._streams.remove(replay)
                    continue
                due = min(len(replay.ids), int((now - replay.start) * self.rate) + 1)
                if due > replay.sent:
                    last = due >= len(replay.ids)
                    replay.stream.put(replay.ids[replay.sent:due], "length" if last else None)
                    replay.sent = due
                    if last:
                        self._streams.remove(replay)
            await asyncio.sleep(self.tick_seconds)

    async def close(self) -> None:
        for replay in self._streams:
            replay.stream.cancel()
        self._streams.clear()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)


def replay_map(completion: Completion) -> bytes:
    """A Codec map document for the replayed ids: each id renders as the text it added when the
    completion was recorded (an identity map), so a node in front of a replaying upstream
    detokenizes the answer like any other."""
    vocab: dict[str, int] = {}
    taken: set[int] = set()
    for token_id, piece in zip(completion.ids, completion.pieces, strict=False):
        if token_id in taken:
            continue
        key = piece
        while key in vocab:  # one text per id: a repeated piece of another id gets a marker
            key += "\u200b"
        vocab[key] = token_id
        taken.add(token_id)
    return map_bytes({"version": "2", "id": "bench-replay", "vocab": vocab, "special_tokens": {}})


class ReplayBackend(LocalBackend):
    """A :class:`LocalBackend` around a :class:`ReplayEngine` that serves a stand-in Codec map (the
    node and the Codec-HTTP upstream use it like any local backend)."""

    def __init__(self, completion: Completion, *, rate: float, tokens: int | None = None) -> None:
        engine = ReplayEngine(completion, rate=rate, tokens=tokens)
        super().__init__(engine, engine, ModelInfo(engine.model_id, None))  # type: ignore[arg-type]
        self._replay_map = replay_map(completion)

    async def codec_map(self) -> CodecMapInfo:
        return CodecMapInfo(map_id="bench-replay", map_hash=map_sha256(self._replay_map), data=self._replay_map)


@dataclass
class _Replay:
    stream: Any
    ids: list[int]
    start: float
    sent: int = 0


def _main() -> None:  # pragma: no cover - maintenance entry point
    logging.basicConfig(level=logging.INFO)
    completion = asyncio.run(record_completion())
    print(f"{len(completion.ids)} tokens -> {DEFAULT_COMPLETION_PATH}")


if __name__ == "__main__":  # pragma: no cover
    _main()
