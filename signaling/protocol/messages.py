"""Signalling JSON messages: build (exact key order, compact) and parse (validated).

Pure: no I/O. Topic strategies (trystero-wire §5.2, §5.3) and WebTorrent tracker messages (§6.4).
Builders emit the byte-exact text ``JSON.stringify`` produces in Trystero; parsers are tolerant of
extra fields and strict about the rules a Trystero receiver enforces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from signaling.base import SignalingError

__all__ = [
    "Candidate",
    "Signal",
    "SignalingMessageError",
    "TrackerAnnounceReply",
    "TrackerAnswer",
    "TrackerMessage",
    "TrackerNotice",
    "TrackerOffer",
    "build_announce",
    "build_answer",
    "build_answerer_candidate",
    "build_candidate_json",
    "build_offer",
    "build_offerer_candidate",
    "build_tracker_announce",
    "build_tracker_answer",
    "dumps_compact",
    "parse_candidate_json",
    "parse_signal",
    "parse_tracker_message",
]

MAX_SIGNAL_TEXT_BYTES = 256 * 1024
"""Signalling texts larger than this are refused before JSON parsing (SDPs are a few KB)."""


class SignalingMessageError(SignalingError):
    """A relay delivered text that is not a valid signalling message; drop it."""


def dumps_compact(value: Any) -> str:
    """``JSON.stringify``-style text: no spaces, non-ASCII kept, dict order preserved (P11)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _with_passive(fields: dict[str, Any], passive: bool) -> str:
    if passive:
        fields["passive"] = True
    return dumps_compact(fields)


# -- topic strategies: builders (§5.2, keys in emitted order) --------------------------------------


def build_announce(peer_id: str, *, passive: bool = False) -> str:
    """Announce (root topic) or counter-announce (remote self topic): ``{"peerId":…}``."""
    return _with_passive({"peerId": peer_id}, passive)


def build_offer(peer_id: str, offer_id: str, sealed_sdp: str, *, passive: bool = False) -> str:
    """Offer to the remote self topic: ``peerId, offerId, offer``."""
    return _with_passive({"peerId": peer_id, "offerId": offer_id, "offer": sealed_sdp}, passive)


def build_offerer_candidate(
    peer_id: str, offer_id: str, sealed_candidate: str, *, passive: bool = False
) -> str:
    """Offerer's trickled candidate: ``peerId, offerId, candidate``."""
    fields = {"peerId": peer_id, "offerId": offer_id, "candidate": sealed_candidate}
    return _with_passive(fields, passive)


def build_answer(
    peer_id: str, sealed_sdp: str, offer_id: str | None = None, *, passive: bool = False
) -> str:
    """Answer to the offerer's self topic: ``peerId, answer[, offerId]`` (answer comes first)."""
    fields: dict[str, Any] = {"peerId": peer_id, "answer": sealed_sdp}
    if offer_id is not None:  # echoed only when the offer carried one
        fields["offerId"] = offer_id
    return _with_passive(fields, passive)


def build_answerer_candidate(
    peer_id: str, sealed_candidate: str, offer_id: str | None = None, *, passive: bool = False
) -> str:
    """Answerer's trickled candidate: ``peerId, candidate[, offerId]`` (same builder as answer)."""
    fields: dict[str, Any] = {"peerId": peer_id, "candidate": sealed_candidate}
    if offer_id is not None:
        fields["offerId"] = offer_id
    return _with_passive(fields, passive)


# -- topic strategies: parser (§5.3) ---------------------------------------------------------------

SignalKind = Literal["announce", "offer", "candidate", "answer"]


@dataclass(frozen=True, slots=True)
class Signal:
    """One validated signalling message.

    Attributes:
        kind: announcement → offer → candidate → answer, classified in that order (§5.3).
        peer_id: the sender's id (plaintext).
        offer_id: the ``offerId`` field when present.
        sealed: the sealed SDP / candidate text for offer, candidate and answer; None for announce.
        passive: the 0.25 ``passive`` flag (ignored by non-passive peers, §5.8).
    """

    kind: SignalKind
    peer_id: str
    offer_id: str | None
    sealed: str | None
    passive: bool = False


def parse_signal(text: str) -> Signal:
    """Parse and validate a signalling text (§5.3).

    The caller checks the topic and drops its own echoes (``signal.peer_id == self_id``).

    Raises:
        SignalingMessageError: not a JSON object, a signal field that is not a non-empty string,
            or a missing / empty ``peerId``.
    """
    if len(text) > MAX_SIGNAL_TEXT_BYTES:
        raise SignalingMessageError("signalling message too large")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SignalingMessageError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SignalingMessageError("not a JSON object")
    for field in ("offer", "answer", "candidate"):
        if field in obj and not (isinstance(obj[field], str) and obj[field]):
            raise SignalingMessageError(f"{field!r} is not a non-empty string")
    peer_id = obj.get("peerId")
    if not isinstance(peer_id, str) or not peer_id:
        raise SignalingMessageError("missing peerId")
    offer_id = obj.get("offerId")
    if not isinstance(offer_id, str) or not offer_id:
        offer_id = None
    passive = obj.get("passive") is True
    kind: SignalKind
    if "offer" in obj:
        kind, sealed = "offer", obj["offer"]
    elif "candidate" in obj:
        kind, sealed = "candidate", obj["candidate"]
    elif "answer" in obj:
        kind, sealed = "answer", obj["answer"]
    else:
        kind, sealed = "announce", None
    return Signal(kind=kind, peer_id=peer_id, offer_id=offer_id, sealed=sealed, passive=passive)


# -- candidate plaintext (§5.2) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """The plaintext of a trickled candidate (``RTCIceCandidate.toJSON()``)."""

    candidate: str
    sdp_mid: str | None = None
    sdp_mline_index: int | None = None
    username_fragment: str | None = None


def build_candidate_json(candidate: Candidate) -> str:
    """``{"candidate","sdpMid","sdpMLineIndex","usernameFragment"}`` in that order."""
    return dumps_compact(
        {
            "candidate": candidate.candidate,
            "sdpMid": candidate.sdp_mid,
            "sdpMLineIndex": candidate.sdp_mline_index,
            "usernameFragment": candidate.username_fragment,
        }
    )


def parse_candidate_json(text: str) -> Candidate:
    """Parse a candidate plaintext; an empty ``candidate`` string is kept (callers skip it).

    Raises:
        SignalingMessageError: not an object or ``candidate`` is not a string.
    """
    if len(text) > MAX_SIGNAL_TEXT_BYTES:
        raise SignalingMessageError("candidate text too large")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SignalingMessageError(f"candidate is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("candidate"), str):
        raise SignalingMessageError("candidate JSON has no 'candidate' string")
    mid = obj.get("sdpMid")
    index = obj.get("sdpMLineIndex")
    ufrag = obj.get("usernameFragment")
    return Candidate(
        candidate=obj["candidate"],
        sdp_mid=mid if isinstance(mid, str) else None,
        sdp_mline_index=index if isinstance(index, int) and not isinstance(index, bool) else None,
        username_fragment=ufrag if isinstance(ufrag, str) and ufrag else None,
    )


# -- WebTorrent trackers (§6.4) --------------------------------------------------------------------


def build_tracker_announce(
    info_hash: str, peer_id: str, offers: list[tuple[str, str]], *, numwant: int | None = None
) -> dict[str, Any]:
    """Announce with offers: ``action, info_hash, peer_id, numwant, offers[{offer_id, offer}]``.

    Args:
        offers: (offer_id, sealed SDP) pairs.
        numwant: defaults to ``len(offers)``, as Trystero sends.

    Returns:
        The message as a dict in emitted key order (tracker adapters serialise dicts).
    """
    return {
        "action": "announce",
        "info_hash": info_hash,
        "peer_id": peer_id,
        "numwant": len(offers) if numwant is None else numwant,
        "offers": [
            {"offer_id": offer_id, "offer": {"type": "offer", "sdp": sealed}}
            for offer_id, sealed in offers
        ],
    }


def build_tracker_answer(
    info_hash: str, peer_id: str, offer_id: str, to_peer_id: str, sealed_sdp: str
) -> dict[str, Any]:
    """Answer sent on the tracker socket the offer came from (a dict in emitted key order)."""
    return {
        "action": "announce",
        "info_hash": info_hash,
        "peer_id": peer_id,
        "answer": {"type": "answer", "sdp": sealed_sdp},
        "offer_id": offer_id,
        "to_peer_id": to_peer_id,
    }


@dataclass(frozen=True, slots=True)
class TrackerOffer:
    """An offer the tracker forwarded from `peer_id`."""

    info_hash: str
    peer_id: str
    offer_id: str
    sealed: str


@dataclass(frozen=True, slots=True)
class TrackerAnswer:
    """An answer from `peer_id` to one of our offers."""

    info_hash: str
    peer_id: str
    offer_id: str
    sealed: str


@dataclass(frozen=True, slots=True)
class TrackerAnnounceReply:
    """The tracker's reply to our announce (``interval`` in seconds, when given)."""

    info_hash: str
    interval: float | None


@dataclass(frozen=True, slots=True)
class TrackerNotice:
    """``failure reason`` / ``warning message`` from the tracker."""

    info_hash: str | None
    text: str
    failure: bool


TrackerMessage = TrackerOffer | TrackerAnswer | TrackerAnnounceReply | TrackerNotice


def _sdp_of(value: Any) -> str | None:
    # 0.23.1+: {"type": ..., "sdp": sealed}; older peers sent the sealed string itself (§6.4).
    if isinstance(value, dict):
        value = value.get("sdp")
    return value if isinstance(value, str) and value else None


def parse_tracker_message(obj: Any) -> TrackerMessage:
    """Classify one JSON object received from a WebTorrent tracker.

    Raises:
        SignalingMessageError: unknown or malformed message.
    """
    if not isinstance(obj, dict):
        raise SignalingMessageError("tracker message is not an object")
    info_hash = obj.get("info_hash")
    info_hash = info_hash if isinstance(info_hash, str) else None
    for key, failure in (("failure reason", True), ("warning message", False)):
        if isinstance(obj.get(key), str):
            return TrackerNotice(info_hash=info_hash, text=obj[key], failure=failure)
    if obj.get("action") != "announce" or info_hash is None:
        raise SignalingMessageError("not an announce message")
    peer_id = obj.get("peer_id")
    offer_id = obj.get("offer_id")
    for key, cls in (("offer", TrackerOffer), ("answer", TrackerAnswer)):
        if key in obj:
            sealed = _sdp_of(obj[key])
            if sealed is None or not isinstance(peer_id, str) or not peer_id:
                raise SignalingMessageError(f"malformed tracker {key}")
            if not isinstance(offer_id, str) or not offer_id:
                raise SignalingMessageError(f"tracker {key} without offer_id")
            return cls(info_hash=info_hash, peer_id=peer_id, offer_id=offer_id, sealed=sealed)
    interval = obj.get("interval")
    seconds: float | None = None
    if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
        seconds = float(interval)
    return TrackerAnnounceReply(info_hash=info_hash, interval=seconds)
