"""Golden values: trystero-wire §3.2 (names), §4 (sealing), §5.2/§6.4 (messages), §8.8 (frames)."""

from __future__ import annotations

import json
import random

import pytest

from meshnode.errors import FrameError
from meshnode.wire import roomframes as rf
from signaling.protocol import messages, names
from signaling.protocol.sealing import Sealer, SealError, seal, unseal

APP, ROOM, PEER = "my-app", "lobby", "AbCdEfGhIjKlMnOpQrSt"
TOKEN = "4dcb6a57f52829144d0071cdc88b53fac87dc6d81fc756df1cd90916ea8ffdba"


# -- §3.2 names and keys ---------------------------------------------------------------------------


def test_worked_values_my_app_lobby() -> None:
    root = names.root_topic(APP, ROOM)
    assert root == "z564c132g302c6qki3c2z374n12711k3x245f"
    assert len(root) == 37
    assert names.self_topic(APP, ROOM, PEER) == "542x232z563w2a2e2i1e181r4w231l4s484r5419"
    assert names.room_token(APP, ROOM) == TOKEN
    assert names.signalling_key("", APP, ROOM).hex() == (
        "8e8fb3e5fa0cbbf026b605585641f880f65b2f0e3c7751cf8695b8909a625189"
    )
    assert names.signalling_key("s3cret", APP, ROOM).hex() == (
        "d0d360b3108d57eef95ba3beea2a5661d976b1d75962def516ec95d993af2f04"
    )
    assert names.nostr_kind(root) == 22637
    assert names.info_hash(root) == "382j1z1l37o6j5o6d593"


def test_b36_digest_is_unpadded_per_byte() -> None:
    # SHA-1("Trystero@my-app@lobby") starts 23 ba 9c: 35 -> "z", 186 -> "56", 156 -> "4c".
    assert names.b36_digest("Trystero@my-app@lobby").startswith("z564c")


@pytest.mark.parametrize(
    ("app", "room", "root", "token", "kind", "info_hash", "key"),
    [
        (
            "unstable-legion-demo-v0",
            "legion-demo",
            "3a4p24x3u1y5oz3e6b5a4f63n2b473vpn6m",
            "a13a285bf849ceb50a51cfbe066935f30dfbf23b46d33da515dc7ce93fd417a3",
            22790,
            "3e4b6v6s3m2w724z5453",
            "0d4d7ea23f47c1b170c1d931d17d0de05e7367ecdc4160a3525acc5b1be74fdb",
        ),
        (
            "unstable-legion-chat-v1",
            "legion-chat",
            "74g3j4p4g1b3j385c3aw4m4q175n5i454j1b6f",
            "9b217a197a069bfc1ffa135072edd4a03efbbed8a66c4a3b1aba5b73f404d137",
            22833,
            "9131d221r346o2l83c49",
            "3ff924f181bcad6e5fcf120f9986c8dbff2f9b87cef3f1b4872b5aa3d400184f",
        ),
    ],
)
def test_legion_rooms(
    app: str, room: str, root: str, token: str, kind: int, info_hash: str, key: str
) -> None:
    assert names.root_topic(app, room) == root
    assert names.room_token(app, room) == token
    assert names.nostr_kind(root) == kind
    assert names.info_hash(root) == info_hash
    assert names.signalling_key("", app, room).hex() == key


def test_password_hash_is_hex_sha256_of_challenge_password_app_room() -> None:
    import hashlib

    expected = hashlib.sha256(b"c0ffee:s3cret:my-app:lobby").hexdigest()
    assert names.password_hash("c0ffee", "s3cret", APP, ROOM) == expected


def test_nostr_kind_counts_utf16_code_units() -> None:
    # "\U0001F600" is two UTF-16 code units 0xD83D 0xDE00.
    assert names.nostr_kind("\U0001f600") == 20000 + (0xD83D + 0xDE00) % 10000
    assert names.nostr_kind("") == 20000


def test_gen_id_alphabet_and_length() -> None:
    rng = random.Random(1)
    ids = [names.gen_id(20, rng) for _ in range(200)]
    assert all(len(i) == 20 and set(i) <= set(names.ID_ALPHABET) for i in ids)
    assert len(set(ids)) == 200
    assert len(names.ID_ALPHABET) == 62
    assert names.gen_id(12) != names.gen_id(12)


# -- §4 sealing ------------------------------------------------------------------------------------


def test_seal_golden_hello() -> None:
    key = names.signalling_key("", APP, ROOM)
    sealed = seal(key, "hello", bytes(range(16)))
    assert sealed == "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15$Z2n8N6F2zAQ4H97PCosgGmqIoSnE"
    assert unseal(key, sealed) == "hello"


def test_seal_uses_random_16_byte_iv() -> None:
    sealer = Sealer(names.signalling_key("", APP, ROOM))
    first, second = sealer.seal("sdp"), sealer.seal("sdp")
    assert first != second
    assert len(first.split("$", 1)[0].split(",")) == 16
    assert sealer.unseal(first) == sealer.unseal(second) == "sdp"


@pytest.mark.parametrize(
    "text",
    ["no-dollar", "1,2,3$!!!", "300,1$AAAA", "$AAAA", "a,b$AAAA", "0,1,2,3,4,5,6,7,8,9,10,11$AAAA"],
)
def test_unseal_malformed_raises_seal_error(text: str) -> None:
    with pytest.raises(SealError):
        unseal(names.signalling_key("", APP, ROOM), text)


def test_unseal_wrong_key_raises_seal_error() -> None:
    sealed = seal(names.signalling_key("right", APP, ROOM), "v=0")
    with pytest.raises(SealError, match="wrong"):
        unseal(names.signalling_key("wrong", APP, ROOM), sealed)


def test_dollar_split_on_first_only() -> None:
    key = names.signalling_key("", APP, ROOM)
    assert unseal(key, seal(key, "a$b$c")) == "a$b$c"


# -- §5.2 / §5.3 signalling messages ---------------------------------------------------------------


def test_message_builders_key_order_and_compactness() -> None:
    assert messages.build_announce("P") == '{"peerId":"P"}'
    assert messages.build_announce("P", passive=True) == '{"peerId":"P","passive":true}'
    assert messages.build_offer("P", "O", "S") == '{"peerId":"P","offerId":"O","offer":"S"}'
    assert (
        messages.build_offerer_candidate("P", "O", "C")
        == '{"peerId":"P","offerId":"O","candidate":"C"}'
    )
    assert messages.build_answer("P", "S", "O") == '{"peerId":"P","answer":"S","offerId":"O"}'
    assert messages.build_answer("P", "S") == '{"peerId":"P","answer":"S"}'
    assert (
        messages.build_answerer_candidate("P", "C", "O")
        == '{"peerId":"P","candidate":"C","offerId":"O"}'
    )
    assert messages.build_answer("P", "S", "O", passive=True).endswith(',"passive":true}')


def test_candidate_plaintext_order() -> None:
    candidate = messages.Candidate("candidate:1 1 udp 2 192.0.2.2 9 typ host", "0", 0, "4183")
    text = messages.build_candidate_json(candidate)
    assert text == (
        '{"candidate":"candidate:1 1 udp 2 192.0.2.2 9 typ host","sdpMid":"0",'
        '"sdpMLineIndex":0,"usernameFragment":"4183"}'
    )
    assert messages.parse_candidate_json(text) == candidate


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ('{"peerId":"x"}', "announce"),
        ('{"peerId":"x","passive":true}', "announce"),
        ('{"peerId":"x","offerId":"o","offer":"s"}', "offer"),
        ('{"peerId":"x","offerId":"o","candidate":"s"}', "candidate"),
        ('{"peerId":"x","answer":"s","offerId":"o"}', "answer"),
        (
            '{"peerId":"x","answer":"s","candidate":"c"}',
            "candidate",
        ),  # order: offer, candidate, answer
    ],
)
def test_parse_signal_classification(text: str, kind: str) -> None:
    assert messages.parse_signal(text).kind == kind


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1]",
        '"x"',
        "{}",
        '{"peerId":""}',
        '{"peerId":5}',
        '{"peerId":"x","offer":""}',
        '{"peerId":"x","offer":7}',
        '{"peerId":"x","answer":null}',
        '{"peerId":"x","candidate":{}}',
    ],
)
def test_parse_signal_rejects(text: str) -> None:
    with pytest.raises(messages.SignalingMessageError):
        messages.parse_signal(text)


def test_tracker_messages() -> None:
    announce = messages.build_tracker_announce("I" * 20, "P" * 20, [("O" * 20, "S")], numwant=3)
    assert messages.dumps_compact(announce) == (
        '{"action":"announce","info_hash":"IIIIIIIIIIIIIIIIIIII","peer_id":"PPPPPPPPPPPPPPPPPPPP",'
        '"numwant":3,"offers":[{"offer_id":"OOOOOOOOOOOOOOOOOOOO","offer":{"type":"offer","sdp":"S"}}]}'
    )
    answer = messages.build_tracker_answer("I" * 20, "P" * 20, "O" * 20, "F" * 20, "S")
    assert list(answer) == ["action", "info_hash", "peer_id", "answer", "offer_id", "to_peer_id"]
    assert answer["answer"] == {"type": "answer", "sdp": "S"}

    forwarded = {
        "action": "announce",
        "offer": {"type": "offer", "sdp": "X"},
        "offer_id": "o",
        "peer_id": "p",
        "info_hash": "i",
    }
    assert messages.parse_tracker_message(forwarded) == messages.TrackerOffer("i", "p", "o", "X")
    legacy = {**forwarded, "offer": "X"}  # before 0.23.1 the SDP was a bare string
    assert isinstance(messages.parse_tracker_message(legacy), messages.TrackerOffer)
    back = {
        "action": "announce",
        "answer": {"type": "answer", "sdp": "Y"},
        "offer_id": "o",
        "peer_id": "q",
        "info_hash": "i",
    }
    assert messages.parse_tracker_message(back) == messages.TrackerAnswer("i", "q", "o", "Y")
    reply = {
        "complete": 0,
        "incomplete": 1,
        "action": "announce",
        "interval": 120,
        "info_hash": "i",
    }
    assert messages.parse_tracker_message(reply) == messages.TrackerAnnounceReply("i", 120.0)
    notice = messages.parse_tracker_message({"failure reason": "bad"})
    assert isinstance(notice, messages.TrackerNotice) and notice.failure
    with pytest.raises(messages.SignalingMessageError):
        messages.parse_tracker_message({"action": "scrape", "info_hash": "i"})


# -- §8.8 frames -----------------------------------------------------------------------------------

CAP_FRAME = bytes.fromhex(
    "010040" + TOKEN.encode().hex() + "636170" + "00" * 29 + "0000" + "09" + "ff" + "7b2261223a317d"
)


def test_room_frame_json_on_cap() -> None:
    payload, kind = rf.encode_payload({"a": 1})
    chunks = rf.encode_action("cap", 0, payload, kind)
    assert len(chunks) == 1 and len(chunks[0]) == 43
    frame = rf.encode_room_frame(TOKEN, chunks[0])
    assert len(frame) == 110
    assert frame == CAP_FRAME


def test_room_frame_binary_on_cf() -> None:
    payload, kind = rf.encode_payload(b"\x01\x02\x03")
    (chunk,) = rf.encode_action("cf", 0, payload, kind)
    frame = rf.encode_room_frame(TOKEN, chunk)
    assert len(chunk) == 39 and len(frame) == 106
    assert frame[:67] == CAP_FRAME[:67]
    assert frame[67:] == b"cf" + bytes(30) + b"\x00\x00\x0d\xff\x01\x02\x03"


def test_presence_frame() -> None:
    frame = rf.encode_presence_frame(TOKEN, True)
    assert frame == b"\x02\x01\x00\x40" + TOKEN.encode()
    assert len(frame) == 68
    assert rf.encode_presence_frame(TOKEN, False)[:2] == b"\x02\x00"
    assert rf.decode_frame(frame) == rf.PresenceFrame(token=TOKEN, present=True)


def test_overhead_is_103_bytes() -> None:
    payload, kind = rf.encode_payload(b"")
    (chunk,) = rf.encode_action("x", 0, payload, kind)
    assert len(rf.encode_room_frame(TOKEN, chunk)) == 103


def test_string_with_metadata_two_chunks() -> None:
    payload, kind = rf.encode_payload("hi")
    assert kind == 0
    chunks = rf.encode_action("cap", 1, payload, kind, {"m": 1})
    assert [c[32:].hex() for c in chunks] == ["000102807b226d223a317d", "000101ff6869"]


def test_number_payload() -> None:
    payload, kind = rf.encode_payload(42)
    (chunk,) = rf.encode_action("cap", 0, payload, kind)
    assert chunk[34] == 0x09 and chunk[36:] == b"42"


def test_large_binary_with_metadata_four_chunks() -> None:
    payload, kind = rf.encode_payload(bytes(40000))
    chunks = rf.encode_action("file", 0, payload, kind, {"name": "f"})
    assert [(c[34], c[35]) for c in chunks] == [
        (0x0E, 0x40),
        (0x0C, 0x80),
        (0x0C, 0xBF),
        (0x0D, 0xFF),
    ]
    assert [len(c) for c in chunks] == [36 + len(b'{"name":"f"}'), 16384, 16384, 7340]


def test_empty_string_with_metadata_is_single_chunk_0x03() -> None:
    chunks = rf.encode_action("x", 0, b"", 0, {"a": 1})
    assert len(chunks) == 1 and chunks[0][34] == 0x03
    delivery = rf.Reassembler().feed("p", chunks[0])
    assert delivery is not None and delivery.payload == "" and delivery.metadata == {"a": 1}


def test_falsy_metadata_is_still_metadata() -> None:
    for meta in (0, "", False, None):
        chunks = rf.encode_action("x", 0, b"y", 0, meta)
        assert len(chunks) == 2
        delivery = None
        reassembler = rf.Reassembler()
        for chunk in chunks:
            delivery = reassembler.feed("p", chunk)
        assert delivery is not None and delivery.metadata == meta


def test_nonce_wraps() -> None:
    (chunk,) = rf.encode_action("x", 65536 + 5, b"", 0)
    assert chunk[32:34] == b"\x00\x05"


def test_action_name_limits() -> None:
    rf.encode_name("é" * 16)  # 32 bytes
    with pytest.raises(ValueError):
        rf.encode_name("x" * 33)


def test_receiver_strips_all_nuls_from_name() -> None:
    chunk = b"c\x00a\x00p" + bytes(27) + b"\x00\x00\x01\xff" + b"ok"
    assert rf.decode_chunk(chunk).name == "cap"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x03abc",
        b"\x01\x00",
        b"\x01\x00\x00abc",
        b"\x01\x00\x40abc",
        b"\x02\x01\x00",
        b"\x02\x01\x00\x05ab",
    ],
)
def test_decode_frame_rejects(data: bytes) -> None:
    with pytest.raises(FrameError):
        rf.decode_frame(data)


def test_decode_room_frame() -> None:
    frame = rf.decode_frame(CAP_FRAME)
    assert isinstance(frame, rf.RoomFrame) and frame.token == TOKEN
    delivery = rf.Reassembler().feed("p", frame.chunk)
    assert delivery is not None
    assert (delivery.name, delivery.nonce, delivery.payload) == ("cap", 0, {"a": 1})
    assert delivery.metadata is rf.NO_METADATA


def test_payload_kinds_round_trip() -> None:
    for value, tags in [
        ("héllo", 0x01),
        ({"a": [1, 2.5, None]}, 0x09),
        (b"\x00\xff", 0x0D),
        (True, 0x09),
    ]:
        payload, kind = rf.encode_payload(value)
        (chunk,) = rf.encode_action("k", 0, payload, kind)
        assert chunk[34] == tags
        delivery = rf.Reassembler().feed("p", chunk)
        assert delivery is not None and delivery.payload == value
    assert rf.encode_payload(bytearray(b"ab")) == (b"ab", 0x0C)
    assert rf.encode_payload(memoryview(b"ab")) == (b"ab", 0x0C)


# -- P11 JSON formatting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (-0.0, "0"),
        (1e-7, "1e-7"),
        (1e-6, "0.000001"),
        (1.5e-7, "1.5e-7"),
        (123.456, "123.456"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (1.5e22, "1.5e+22"),
        (2**60, "1152921504606847000"),
        (2**53 - 1, "9007199254740991"),
        (float("nan"), "null"),
        (float("inf"), "null"),
        (0.1 + 0.2, "0.30000000000000004"),
        (5e-324, "5e-324"),
        ('a\u2028\x7f"\\\n\x01', '"a\u2028\x7f\\"\\\\\\n\\u0001"'),
        ("\ud800", '"\\ud800"'),
        ({"b": 1, "2": 2, "1": 3, "01": 4}, '{"1":3,"2":2,"b":1,"01":4}'),
        ({1: "x"}, '{"1":"x"}'),
        ([1, [True, None]], "[1,[true,null]]"),
        ((1, 2), "[1,2]"),
    ],
)
def test_js_json_formatting(value: object, text: str) -> None:
    assert rf.js_json_dumps(value) == text


def test_js_json_rejects_non_json() -> None:
    for value in (b"x", {1, 2}, object(), {("t",): 1}):
        with pytest.raises(rf.PayloadError):
            rf.js_json_dumps(value)


def test_js_json_agrees_with_json_for_plain_values() -> None:
    value = {"s": "é✓", "n": [1, -2, 3.25], "o": {"k": None}}
    assert json.loads(rf.js_json_dumps(value)) == value
