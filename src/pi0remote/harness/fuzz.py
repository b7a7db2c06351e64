"""Property fuzzing of every decode path: only pi0remote's typed errors may escape (hypothesis).

Owns the strategies and one check per decode path (``TARGETS``); ``tests/test_security_fuzz.py`` runs
each with a CI-sized example count and ``benchmarks/fuzz.py`` with the full one. Each check feeds
hostile input to one parser and asserts that it either returns or raises an allowed
:class:`~pi0remote.errors.Pi0RemoteError` subclass (for the server core: that the reply is a
well-formed message whose error code is one of bad input's, never ``policy`` or ``server``).

A *case* is one input fed to a parser: each hypothesis example is fed as drawn and as ``VARIANTS - 1``
mutations of its bytes (truncations, flipped bytes, a spliced length), seeded by the bytes themselves,
so hypothesis's structured inputs reach deep into the parsers and a run stays fast. ``CASES`` counts them.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .. import codec, errors, protocol

INPUT_ERRORS = (errors.ProtocolError, errors.AuthenticationError, errors.InvalidInputError)
BAD_INPUT_CODES = {"protocol", "codec", "too_large", "version", "auth", "invalid_input"}

_DTYPES = st.sampled_from(
    [
        "<f4",
        "<f8",
        "|u1",
        "<i8",
        "|b1",
        "<c8",
        ",",
        "(",
        "O",
        "U4",
        "V8",
        "M8",
        "i4,i4",
        "(2,)f4",
        "",
        "f" * 17,
    ]
)
_SHAPES = st.one_of(
    st.lists(st.integers(-3, 40), max_size=4),
    st.just([2**40, 2**40]),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=5),
)
_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=64),
)


@st.composite
def arrays(draw: Any) -> dict:
    """pi0remote / msgpack-numpy / openpi array maps with hostile fields."""
    layout = draw(st.sampled_from(["nd", "scalar", "openpi", "npgeneric"]))
    dtype = draw(st.one_of(_DTYPES, _LEAF))
    data = draw(st.one_of(st.binary(max_size=96), _LEAF))
    shape = draw(_SHAPES)
    if layout == "nd":
        return {b"nd": True, b"type": dtype, b"kind": b"", b"shape": shape, b"data": data}
    if layout == "scalar":
        return {b"nd": False, b"type": dtype, b"data": data}
    if layout == "openpi":
        return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}
    return {b"__npgeneric__": True, b"data": data, b"dtype": dtype}


VALUES = st.recursive(
    st.one_of(_LEAF, arrays()),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4)), children, max_size=4),
    ),
    max_leaves=12,
)
OBS = st.dictionaries(
    st.sampled_from(["cam_high", "state", "images", "prompt", "jpeg", "rtc", "trap", "x"]),
    st.one_of(
        VALUES,
        st.just({"jpeg": b"\xff\xd8\xff\xc0\x00\x11\x08\x3e\x80\x3e\x80\x03"}),
        st.just({"cam_high": [[[300]]]}),
    ),
    max_size=5,
)


def _packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


MESSAGES = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.integers(0, 255), OBS).map(lambda kv: bytes([kv[0]]) + _packed(kv[1])),
    st.tuples(st.sampled_from([1, 3, 6]), OBS).map(lambda kv: bytes([kv[0]]) + _packed(kv[1])),
    st.tuples(
        st.just(1), st.dictionaries(st.sampled_from(["protocol", "token", "client"]), _LEAF, max_size=3)
    ).map(lambda kv: bytes([kv[0]]) + _packed(kv[1])),
)


VARIANTS = 8
CASES = [0]
"""Inputs fed so far (all targets)."""


def variants(data: bytes, n: int = VARIANTS) -> Iterator[bytes]:
    """``data`` and ``n - 1`` deterministic mutations of it."""
    CASES[0] += n
    yield data
    rng = random.Random(zlib.crc32(data))
    for i in range(n - 1):
        out = bytearray(data)
        how = i % 4
        if how == 0 and out:
            del out[rng.randrange(len(out)) :]
        elif how == 1 and out:
            for _ in range(1 + rng.randrange(3)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif how == 2:
            pos = rng.randrange(len(out) + 1)
            out[pos:pos] = rng.choice(
                [b"\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\x00", b"\r\n", b"\xc6\xff\xff\xff\xf0"]
            )
        elif out:
            a, b = sorted(rng.randrange(len(out)) for _ in range(2))
            out += out[a:b]
        yield bytes(out)


def _allowed(fn: Callable[[], Any], allowed: tuple[type[BaseException], ...] = INPUT_ERRORS) -> None:
    try:
        fn()
    except allowed:
        pass


# -- checks, one per decode path ---------------------------------------------------------------------
def check_unpackb(data: bytes) -> None:
    for v in variants(data):
        _allowed(lambda v=v: codec.unpackb(v), (errors.CodecError,))


def check_structured(value: Any) -> None:
    for v in variants(_packed(value)):
        _allowed(lambda v=v: codec.unpackb(v), (errors.CodecError,))


def check_openpi(value: Any) -> None:
    from ..policies import CANONICAL_INPUT_SPEC, validate_obs
    from ..server.openpi_ws import from_openpi_obs, openpi_unpackb

    def run(data: bytes) -> None:
        obs = from_openpi_obs(openpi_unpackb(data), CANONICAL_INPUT_SPEC)
        validate_obs(obs, CANONICAL_INPUT_SPEC)

    for v in variants(_packed(value)):
        _allowed(lambda v=v: run(v))


def check_frames(chunks: list[bytes]) -> None:
    cuts = [len(c) for c in chunks]

    def run(data: bytes) -> None:
        decoder = protocol.FrameDecoder(max_message_bytes=4096, start_bytes=64)
        pos = 0
        for n in [*cuts, len(data)]:
            decoder.feed(data[pos : pos + n])
            pos += n
            while (message := decoder.pop()) is not None:
                _allowed(lambda m=message: protocol.decode_message(m))

    for v in variants(b"".join(chunks)):
        _allowed(lambda v=v: run(v), (errors.ProtocolError,))


def check_datagrams(chunks: list[bytes]) -> None:
    from ..quic_common import DatagramSplitter

    def run(data: bytes) -> None:
        splitter = DatagramSplitter(max_size=2048)
        for i in range(0, len(data), 1 + len(data) // max(1, len(chunks))):
            splitter.feed(data[i : i + 1 + len(data) // max(1, len(chunks))])

    for v in variants(b"".join(chunks)):
        _allowed(lambda v=v: run(v), (errors.ProtocolError,))


def check_http_head(head: bytes) -> None:
    from ..server.http import parse_head

    for v in variants(head):
        _allowed(lambda v=v: parse_head(v), (errors.ProtocolError,))


def check_jpeg(data: bytes) -> None:
    from ..jpeg import decode_jpeg_fields
    from ..policies import CANONICAL_INPUT_SPEC

    for v in variants(data):
        obs = {"cam_high": {"jpeg": v}}
        _allowed(lambda obs=obs: decode_jpeg_fields(obs, spec=CANONICAL_INPUT_SPEC, max_total_bytes=2**22))


def check_client_reply(kind: int, value: Any) -> None:
    """The client's reply decoding (``ClientSession.reply`` / ``accept_metadata``) on hostile messages."""
    from types import SimpleNamespace

    from ..client.session import ClientSession

    session: Any = SimpleNamespace(
        options=SimpleNamespace(max_message_bytes=2**16), metadata=None, reply=None
    )
    session.reply = lambda m, e: ClientSession.reply(session, m, e)

    def run(message: bytes) -> None:
        for call in (
            lambda: session.reply(message, protocol.RESULT),
            lambda: ClientSession.accept_metadata(session, message),
        ):
            try:
                call()
            except errors.Pi0RemoteError:  # the server's typed error rebuilt, or the client's own
                pass

    for v in variants(bytes([kind]) + _packed(value)):
        _allowed(lambda v=v: run(v))


_CORE: dict[str, Any] = {}


def _core() -> Any:
    if not _CORE:
        from ..policies.builtin import ZerosPolicy
        from ..server.core import ServerCore

        _CORE["core"] = ServerCore(ZerosPolicy(), token="t", max_message_bytes=2**20)
    return _CORE["core"]


def check_core(message: bytes, authenticated: bool) -> None:
    from ..server.core import Session

    for v in variants(message):
        reply = _core().handle_now(v, Session(authenticated=authenticated, transport="fuzz"), blocking=True)
        assert reply is not None
        kind, body = protocol.decode_message(reply[0])
        if kind == protocol.ERROR:
            assert body["type"] in BAD_INPUT_CODES, (v, body)


# -- the targets -----------------------------------------------------------------------------------------
_JPEG_SEED = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f"
)

TARGETS: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {
    "codec.unpackb(bytes)": (check_unpackb, (st.binary(max_size=400),)),
    "codec.unpackb(structured)": (check_structured, (VALUES,)),
    "openpi decode": (check_openpi, (OBS,)),
    "FrameDecoder": (check_frames, (st.lists(st.binary(max_size=200), max_size=6),)),
    "DatagramSplitter": (check_datagrams, (st.lists(st.binary(max_size=200), max_size=6),)),
    "HTTP head": (
        check_http_head,
        (
            st.one_of(
                st.binary(max_size=300),
                st.lists(
                    st.sampled_from(
                        [
                            b"GET / HTTP/1.1",
                            b"\r\n",
                            b"Host: x",
                            b":",
                            b" ",
                            b"\n",
                            b"\r",
                            b"Content-Length: 1",
                            b"\x00",
                            b"X",
                        ]
                    ),
                    max_size=12,
                ).map(b"".join),
            ),
        ),
    ),
    "JPEG fields": (
        check_jpeg,
        (st.one_of(st.binary(max_size=120), st.binary(max_size=80).map(lambda b: _JPEG_SEED + b)),),
    ),
    "client reply": (check_client_reply, (st.sampled_from([0, 2, 4, 5, 9]), VALUES)),
    "ServerCore.handle_now": (check_core, (MESSAGES, st.booleans())),
}


def run_target(name: str, examples: int, *, seed: int | None = None) -> None:
    """Run one target for ``examples`` cases (raises on the first input that lets a builtin error escape)."""
    fn, strategies = TARGETS[name]
    decorated = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
    )(given(*strategies)(fn))
    if seed is not None:
        from hypothesis import seed as hseed

        decorated = hseed(seed)(decorated)
    decorated()


__all__ = ["CASES", "TARGETS", "VARIANTS", "run_target", "variants"]
