"""Codec tokenizer maps: build them from a HF tokenizer, serialise, pin, pick, and detokenize.

Spec: ``legion-mesh.md`` §4.

* §4.1 — the codec-maps "v2" document (:func:`build_map`), serialised the way the registry's
  converter does: ``JSON.stringify(doc, null, 2)`` with no trailing newline (:func:`map_bytes`).
  JavaScript orders integer-like object keys first, so ``vocab`` keys ``"0"``…``"9"`` come before
  the rest; :func:`map_bytes` reproduces that to keep pins byte-stable.
* §4.2 — pins are the sha256 of the exact file bytes, written ``sha256:<hex>`` (:func:`map_sha256`).
* §4.3 — the browser detokenizer rules (:class:`Detokenizer`).
* §4.5 — how Legion browsers choose a map from ``cap.modelId`` (:func:`family_for_model_id`).

The module takes tokenizers by duck typing (``backend_tokenizer.to_str()`` or ``to_str()``) and
never imports transformers or torch.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from meshnode.errors import ModelError, ProtocolError

logger = logging.getLogger(__name__)

__all__ = [
    "MAP_VERSION",
    "Detokenizer",
    "build_map",
    "family_for_model_id",
    "map_bytes",
    "map_sha256",
    "parse_map",
]

MAP_VERSION: Final = "2"
"""``version`` of the documents built here (legion-mesh §4.1)."""

DEFAULT_FAMILY: Final = "qwen/qwen2"
"""legion-mesh §4.5 step 4: what browsers fall back to when no pattern matches."""

_MAP_ID_RE: Final = re.compile(r"[a-z0-9._/-]+")

# legion-mesh §4.5 step 3: tested in order, anchored at the start, case-insensitive.
_FAMILY_PATTERNS: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern, re.IGNORECASE), family)
    for pattern, family in (
        (r"^Qwen2", "qwen/qwen2"),
        (r"^SmolLM2", "huggingfacetb/smollm2"),
        (r"^Hermes-3-Llama-3", "meta-llama/llama-3"),
        (r"^Llama-3", "meta-llama/llama-3"),
        (r"^Llama-2", "meta-llama/llama-2"),
        (r"^gemma-2", "google/gemma-2"),
        (r"^gemma", "google/gemma-1"),
        (r"^Phi-4", "microsoft/phi-4"),
        (r"^Phi-3", "microsoft/phi-3"),
        (r"^Mistral-Nemo", "mistralai/mistral-nemo"),
        (r"^Mistral", "mistralai/mistral-v3"),
        (r"^Mixtral", "mistralai/mixtral"),
        (r"^Codestral", "mistralai/codestral"),
        (r"^DeepSeek", "deepseek-ai/deepseek-v3"),
        (r"^falcon", "tiiuae/falcon"),
        (r"^claude", "anthropic/claude-3-text"),
    )
)

# legion-mesh §4.5 step 2: first "-q<digit>…-MLC", then a bare "-MLC", at the end.
_QUANT_MLC_SUFFIX_RE: Final = re.compile(r"-q\d.*-MLC$", re.IGNORECASE)
_MLC_SUFFIX_RE: Final = re.compile(r"-MLC$", re.IGNORECASE)

# The GPT-2 pre-tokenizer regex that a HF ``ByteLevel`` pre-tokenizer applies with use_regex=true.
_GPT2_PATTERN: Final = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Regex alternatives whose regex-free ``pre_tokenizer_program`` op is known (legion-mesh §4.1).
# A pattern with any other alternative gets no program rather than a guessed one.
_PROGRAM_OPS: Final[dict[str, dict[str, Any]]] = {
    r" ?\p{L}+": {"op": "letters", "lead_space": True},
    r" ?\p{N}": {"op": "numbers", "max_run": 1},
    r" ?[^\s\p{L}\p{N}]+": {"op": "punct_run", "lead_space": True},
    r"\s+(?!\S)": {"op": "trailing_ws"},
    r"\s+": {"op": "ws_run"},
}
_LITERAL_ALTERNATIVE_RE: Final = re.compile(r"[A-Za-z0-9']+")

_METASPACE: Final = "\u2581"  # "▁"
_REPLACEMENT: Final = "\ufffd"


# --------------------------------------------------------------------------------------------------
# Building a map from a tokenizer (legion-mesh §4.1)
# --------------------------------------------------------------------------------------------------


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizer.json`` document of a fast HF tokenizer or a ``tokenizers.Tokenizer``."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        raise ModelError(
            f"{type(tokenizer).__name__} is not a fast tokenizer (no backend_tokenizer.to_str())"
        )
    try:
        document = json.loads(to_str())
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot read the tokenizer JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise ModelError("tokenizer JSON has no model section")
    return document


def _components(node: Any) -> list[dict[str, Any]]:
    """Flatten a pre-tokenizer / decoder / normalizer tree (``Sequence`` nodes) into its leaves."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        children = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers")
        leaves: list[dict[str, Any]] = []
        for child in children or []:
            leaves.extend(_components(child))
        return leaves
    return [node]


def _model_vocab(model: dict[str, Any]) -> dict[str, int]:
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        return {str(key): int(value) for key, value in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
        return {str(entry[0]): index for index, entry in enumerate(vocab)}
    raise ModelError(f"unsupported tokenizer model {model.get('type')!r}: no vocab")


def _merges(model: dict[str, Any]) -> list[str] | None:
    merges = model.get("merges")
    if model.get("type") != "BPE" or merges is None:
        return None
    # tokenizers ≥ 0.20 serialises merges as pairs; older files as "a b" strings (the map format).
    return [" ".join(entry) if isinstance(entry, list) else str(entry) for entry in merges]


def _encoder(document: dict[str, Any]) -> str | None:
    leaves = _components(document.get("pre_tokenizer")) + _components(document.get("decoder"))
    kinds = {leaf.get("type") for leaf in leaves}
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds:
        return "metaspace"
    # llama-2 / mistral / gemma style: the decoder replaces "▁" with a space.
    for leaf in _components(document.get("decoder")):
        pattern = leaf.get("pattern")
        if (
            leaf.get("type") == "Replace"
            and isinstance(pattern, dict)
            and pattern.get("String") == _METASPACE
        ):
            return "metaspace"
    return None


def _pre_tokenizer_pattern(document: dict[str, Any]) -> str | None:
    leaves = _components(document.get("pre_tokenizer"))
    for leaf in leaves:
        pattern = leaf.get("pattern")
        if leaf.get("type") == "Split" and isinstance(pattern, dict) and "Regex" in pattern:
            return str(pattern["Regex"])
    if any(leaf.get("type") == "ByteLevel" and leaf.get("use_regex", True) for leaf in leaves):
        if any(leaf.get("type") == "Digits" and leaf.get("individual_digits") for leaf in leaves):
            # Digits(individual_digits) before ByteLevel: numbers split one digit at a time.
            return _GPT2_PATTERN.replace(r" ?\p{N}+", r" ?\p{N}")
        return _GPT2_PATTERN
    return None


def _split_alternatives(pattern: str) -> list[str] | None:
    """Split a regex on its top-level ``|``; ``None`` if its groups or classes don't balance."""
    parts: list[str] = []
    depth = 0
    in_class = False
    start = 0
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(pattern[start:index])
            start = index + 1
        index += 1
    if depth != 0 or in_class:
        return None
    parts.append(pattern[start:])
    return parts


def _pre_tokenizer_program(pattern: str) -> dict[str, Any] | None:
    """Regex-free op list for the patterns whose ops are known (legion-mesh §4.1), else ``None``."""
    alternatives = _split_alternatives(pattern)
    if not alternatives:
        return None
    ops: list[dict[str, Any]] = []
    literals: list[str] = []
    for alternative in alternatives:
        if _LITERAL_ALTERNATIVE_RE.fullmatch(alternative):
            literals.append(alternative)
            continue
        if literals:
            ops.append({"op": "literals", "patterns": literals})
            literals = []
        op = _PROGRAM_OPS.get(alternative)
        if op is None:
            return None
        ops.append(dict(op))
    if literals:
        ops.append({"op": "literals", "patterns": literals})
    return {"version": 1, "ops": ops}


def _byte_fallback_range(model: dict[str, Any], vocab: Mapping[str, int]) -> tuple[int, int] | None:
    """The ``<0x00>``…``<0xFF>`` id range of a SentencePiece-style BPE, if contiguous."""
    if not model.get("byte_fallback"):
        return None
    start = vocab.get("<0x00>")
    if start is None:
        return None
    for byte in range(256):
        if vocab.get(f"<0x{byte:02X}>") != start + byte:
            logger.warning("byte-fallback tokens are not contiguous; omitting the range")
            return None
    return start, start + 255


COMMUNITY_MAPS: Final[dict[str, tuple[str, str]]] = {
    "huggingfacetb/smollm2": ("sha256:8bb91e72d05775a013139783577dbc9f4930a2db19704fc90f2ca17c7bef9f60",
                              "2026-05-08T20:42:34.952Z"),
}
"""Published community maps (wdunn001/codec-maps): map id -> (pin of the file, its ``published_at``).
A built map whose content equals the published one takes its ``published_at`` too, so its bytes
(and hash) are the community file's."""


def build_map(tokenizer: Any, map_id: str, *, published_at: str | None = None) -> dict[str, Any]:
    """Generate the codec-maps v2 document for a fast HF tokenizer (legion-mesh §4.1).

    The tokenizer is read through ``tokenizer.backend_tokenizer.to_str()`` (a
    ``PreTrainedTokenizerFast`` / ``TokenizersBackend``) or ``tokenizer.to_str()`` (a bare
    ``tokenizers.Tokenizer``). Keys follow the published files' order: ``id``, ``version``,
    ``vocab_size``, ``vocab``, ``published_at``, ``encoder``, ``merges``,
    ``pre_tokenizer_pattern``, ``pre_tokenizer_program``, ``byte_fallback_start``,
    ``byte_fallback_end``, ``special_tokens``; keys that do not apply are absent.

    * ``vocab``: the model vocab with every added token merged in, ordered by id;
      ``vocab_size`` is its number of entries (not the embedding size).
    * ``encoder``: ``byte_level`` (a ByteLevel pre-tokenizer or decoder), ``metaspace`` (Metaspace,
      or a decoder replacing ``▁``), else absent.
    * ``merges``: BPE merges as ``"a b"`` strings in priority order.
    * ``pre_tokenizer_pattern`` (byte_level only): a ``Split`` regex, or the GPT-2 regex implied
      by ``ByteLevel(use_regex=true)`` (single digits when a ``Digits(individual_digits)`` step
      precedes it). ``pre_tokenizer_program`` is added only when every alternative of the
      pattern has a known op.
    * ``byte_fallback_start``/``_end``: the contiguous ``<0x00>``…``<0xFF>`` range of a
      ``byte_fallback`` BPE.
    * ``special_tokens``: added tokens with ``special: true``, by name. ``tool_calling`` is not
      generated.
    * ``published_at``: never the clock, so the document (and its hash) is a function of the
      tokenizer alone: the given value; else, when the content equals a published community map
      (:data:`COMMUNITY_MAPS`), that map's value (the bytes are then the community file's); else
      absent.

    Args:
        tokenizer: A fast tokenizer (see above).
        map_id: Family id such as ``huggingfacetb/smollm2``; must match ``[a-z0-9._/-]+``.
        published_at: ISO timestamp to record (see above for the default).

    Returns:
        The map document (a plain dict; serialise it with :func:`map_bytes`).

    Raises:
        ModelError: ``map_id`` is invalid, or the tokenizer is not a fast tokenizer with a vocab.
    """
    if not _MAP_ID_RE.fullmatch(map_id):
        raise ModelError(f"map id {map_id!r} must match [a-z0-9._/-]+")
    document = _tokenizer_json(tokenizer)
    model = document["model"]
    vocab = _model_vocab(model)
    special: dict[str, int] = {}
    for added in document.get("added_tokens") or []:
        content, token_id = added.get("content"), added.get("id")
        if not isinstance(content, str) or type(token_id) is not int:
            continue
        vocab[content] = token_id
        if added.get("special"):
            special[content] = token_id
    # Python dicts keep first insertion order on update, so re-sort by id for a stable order.
    vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
    special = dict(sorted(special.items(), key=lambda item: item[1]))

    result: dict[str, Any] = {
        "id": map_id,
        "version": MAP_VERSION,
        "vocab_size": len(vocab),
        "vocab": vocab,
    }
    encoder = _encoder(document)
    if encoder is not None:
        result["encoder"] = encoder
    merges = _merges(model)
    if merges is not None:
        result["merges"] = merges
    if encoder == "byte_level":
        pattern = _pre_tokenizer_pattern(document)
        if pattern is not None:
            result["pre_tokenizer_pattern"] = pattern
            program = _pre_tokenizer_program(pattern)
            if program is not None:
                result["pre_tokenizer_program"] = program
    fallback = _byte_fallback_range(model, vocab)
    if fallback is not None:
        result["byte_fallback_start"], result["byte_fallback_end"] = fallback
    result["special_tokens"] = special
    if published_at is not None:
        return _with_published_at(result, published_at)
    known = COMMUNITY_MAPS.get(map_id)
    if known is not None:
        candidate = _with_published_at(result, known[1])
        if map_sha256(map_bytes(candidate)) == known[0]:
            return candidate
    return result


def _with_published_at(document: dict[str, Any], published_at: str) -> dict[str, Any]:
    """The document with ``published_at`` right after ``vocab``, where the published files keep it."""
    out: dict[str, Any] = {}
    for key, value in document.items():
        out[key] = value
        if key == "vocab":
            out["published_at"] = published_at
    return out


# --------------------------------------------------------------------------------------------------
# Serialisation and pins (legion-mesh §4.1, §4.2)
# --------------------------------------------------------------------------------------------------

_ARRAY_INDEX_RE: Final = re.compile(r"0|[1-9][0-9]*")
_LONE_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")


def _is_array_index(key: str) -> bool:
    return _ARRAY_INDEX_RE.fullmatch(key) is not None and int(key) <= 2**32 - 2


def _js_key_order(value: Any) -> Any:
    """Reorder object keys as a JavaScript engine enumerates them: array indices ascending first."""
    if isinstance(value, Mapping):
        indices = sorted((key for key in value if _is_array_index(key)), key=int)
        others = [key for key in value if not _is_array_index(key)]
        return {key: _js_key_order(value[key]) for key in indices + others}
    if isinstance(value, list | tuple):
        return [_js_key_order(item) for item in value]
    return value


def map_bytes(doc: Mapping[str, Any]) -> bytes:
    """Serialise a map document exactly as ``JSON.stringify(doc, null, 2)`` followed by UTF-8.

    Two-space indentation, ``": "`` separators, non-ASCII written literally, no trailing newline,
    integer-like keys first (JavaScript property order) and lone surrogates escaped as
    ``\\udxxx`` (well-formed ``JSON.stringify``).

    Args:
        doc: A map document (keys must be strings).

    Returns:
        The file bytes; hash them with :func:`map_sha256`.
    """
    text = json.dumps(_js_key_order(doc), ensure_ascii=False, indent=2)
    text = _LONE_SURROGATE_RE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    return text.encode("utf-8")


def map_sha256(data: bytes) -> str:
    """Pin of a map file: ``sha256:<64 lower-case hex>`` of its exact bytes (legion-mesh §4.2)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_map(data: bytes, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """Verify (optionally) and parse map file bytes, checking the fields the detokenizer needs.

    Args:
        data: The exact file bytes.
        expected_sha256: A pin, ``sha256:<hex>`` or bare hex; a mismatch is rejected.

    Returns:
        The parsed document.

    Raises:
        ProtocolError: Hash mismatch, invalid JSON, or a malformed document.
    """
    if expected_sha256 is not None:
        expected = expected_sha256.lower().removeprefix("sha256:")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ProtocolError(f"map hash sha256:{actual} does not match sha256:{expected}")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"map is not valid JSON: {exc}") from exc
    _validate_map(document)
    return document  # type: ignore[no-any-return]


def _validate_map(doc: Any) -> None:
    if not isinstance(doc, dict):
        raise ProtocolError("map must be a JSON object")
    vocab = doc.get("vocab")
    if not isinstance(vocab, dict) or not all(type(v) is int and v >= 0 for v in vocab.values()):
        raise ProtocolError("map vocab must be an object of non-negative integer ids")
    special = doc.get("special_tokens", {})
    if not isinstance(special, dict) or not all(type(v) is int for v in special.values()):
        raise ProtocolError("map special_tokens must be an object of integer ids")
    encoder = doc.get("encoder")
    if encoder not in (None, "byte_level", "metaspace"):
        raise ProtocolError(f"unknown map encoder {encoder!r}")
    start, end = doc.get("byte_fallback_start"), doc.get("byte_fallback_end")
    if (start is None) != (end is None):
        raise ProtocolError("byte_fallback_start and byte_fallback_end come together")
    if start is not None and not (type(start) is int and type(end) is int and 0 <= start <= end):
        raise ProtocolError("byte fallback range must be two ordered non-negative integers")


# --------------------------------------------------------------------------------------------------
# Picking a map from a modelId (legion-mesh §4.5)
# --------------------------------------------------------------------------------------------------


def family_for_model_id(model_id: str, aliases: Mapping[str, str] | None = None) -> str:
    """Resolve the map family a Legion browser picks for a sender's ``cap.modelId`` (§4.5).

    Steps: (1) exact lookup in ``aliases``; (2) strip a trailing ``-q<digit>…-MLC`` and then a bare
    ``-MLC`` (case-insensitive) and look up again; (3) match the part after the last ``/`` against
    the pattern table in order, anchored and case-insensitive; (4) default ``qwen/qwen2``.
    Steps 1–2 only look anything up when ``aliases`` is given (the classic demo ships none).

    Args:
        model_id: The advertised model id, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``.
        aliases: Optional ``aliases.json`` contents (model id → family id).

    Returns:
        The family id, e.g. ``huggingfacetb/smollm2``.
    """
    if aliases and model_id in aliases:
        return aliases[model_id]
    stripped = _MLC_SUFFIX_RE.sub("", _QUANT_MLC_SUFFIX_RE.sub("", model_id))
    if aliases and stripped in aliases:
        return aliases[stripped]
    tail = stripped.rsplit("/", 1)[-1]
    for pattern, family in _FAMILY_PATTERNS:
        if pattern.match(tail):
            return family
    return DEFAULT_FAMILY


# --------------------------------------------------------------------------------------------------
# Detokenizer (legion-mesh §4.3)
# --------------------------------------------------------------------------------------------------


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte→unicode table (legion-mesh §4.3 rule 2).

    Bytes 33–126, 161–172 and 174–255 stand for themselves; the other 68 bytes map, in increasing
    order, to U+0100, U+0101, …
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(byte): byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table.values():
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


_UNICODE_TO_BYTE: Final = _gpt2_unicode_to_byte()


class Detokenizer:
    """Turns a stream's token ids into text with the browser's rules (legion-mesh §4.3).

    One instance per stream; call :meth:`reset` between streams. Rules, in order for each id:

    1. an id in ``[byte_fallback_start, byte_fallback_end]`` adds byte ``id - start`` to the byte
       buffer;
    2. special ids (``special_tokens``) force-flush the buffer and are skipped (or rendered as their
       text with ``render_special=True``); an id missing from ``vocab`` force-flushes and yields
       U+FFFD;
    3. ``byte_level`` maps: the token's characters go back to bytes through the inverse GPT-2 table
       (a character outside the table contributes its own UTF-8 bytes) and join the buffer;
    4. ``metaspace`` / identity maps: the buffer is force-flushed, then the token text is emitted
       with ``▁`` → space (the leading space is kept, unlike HF).

    Buffered bytes are emitted as soon as they form complete UTF-8 characters, so a character
    split across frames appears when its last byte arrives; invalid bytes become U+FFFD with the
    same maximal-subpart rule as ``bytes.decode(errors="replace")`` (and HF's lossy decode).
    A call with ``partial=False`` force-flushes at the end (consumers pass ``not frame.done``).

    Args:
        doc: A map document (as from :func:`build_map` or :func:`parse_map`).

    Raises:
        ProtocolError: The document lacks a usable vocab or has a bad encoder or fallback range.
    """

    def __init__(self, doc: Mapping[str, Any]) -> None:
        _validate_map(doc)
        self._encoder: str | None = doc.get("encoder")
        self._tokens: dict[int, str] = {}
        for token, token_id in doc["vocab"].items():
            self._tokens.setdefault(token_id, token)  # first key wins on a duplicated id
        self._special: frozenset[int] = frozenset(doc.get("special_tokens", {}).values())
        start = doc.get("byte_fallback_start")
        end = doc.get("byte_fallback_end")
        self._fallback: range = range(0) if start is None or end is None else range(start, end + 1)
        self._byte_cache: dict[int, bytes] = {}
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def reset(self) -> None:
        """Drop buffered bytes; call between streams."""
        self._decoder.reset()

    def render(self, ids: Iterable[int], partial: bool, *, render_special: bool = False) -> str:
        """Render the next ids of the stream.

        Args:
            ids: Token ids, in stream order.
            partial: ``True`` while more frames follow; incomplete UTF-8 stays buffered.
                ``False`` on the last frame: leftover bytes are force-decoded (invalid → U+FFFD).
            render_special: Emit special tokens' text instead of skipping them.

        Returns:
            The text these ids complete (possibly empty).
        """
        out: list[str] = []
        for token_id in ids:
            if token_id in self._fallback:
                out.append(self._decoder.decode(bytes((token_id - self._fallback.start,))))
                continue
            token = self._tokens.get(token_id) if type(token_id) is int else None
            if token is None:
                out.append(self._flush())
                out.append(_REPLACEMENT)
                continue
            if token_id in self._special:
                out.append(self._flush())
                if render_special:
                    out.append(token)
                continue
            if self._encoder == "byte_level":
                out.append(self._decoder.decode(self._token_bytes(token_id, token)))
            else:
                out.append(self._flush())
                if self._encoder == "metaspace":
                    token = token.replace(_METASPACE, " ")
                out.append(token)
        if not partial:
            out.append(self._flush())
        return "".join(out)

    def _flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    def _token_bytes(self, token_id: int, token: str) -> bytes:
        cached = self._byte_cache.get(token_id)
        if cached is None:
            parts = bytearray()
            for char in token:
                byte = _UNICODE_TO_BYTE.get(char)
                if byte is None:
                    parts += char.encode("utf-8", errors="surrogatepass")
                else:
                    parts.append(byte)
            cached = bytes(parts)
            self._byte_cache[token_id] = cached
        return cached
