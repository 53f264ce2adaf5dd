"""The bytes of a chunk of trace lines, read with numpy: line boundaries, record
headers (both timestamp formats) and the numbers inside a line.

Lines are never handled one by one in Python: a chunk is copied once into a
zero-padded buffer, cut into lines with numpy, and fixed-position text is read
with SWAR arithmetic ("SIMD within a register") on unaligned little-endian
64-bit loads: eight bytes of text in one ``uint64``, first character lowest.

Two record headers exist (see :mod:`migrator.metrics.trace` for their origin):

* QEMU <= 10.0: ``TID@EPOCH_SEC.USEC:event args``;
* QEMU >= 10.1: ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z event args`` (UTC; glib drops
  the fraction when the microseconds are exactly zero).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "I64",
    "U64",
    "Bools",
    "Lines",
    "RecordHeaders",
    "TraceFormat",
    "ends_with",
    "find_records",
    "parse_hex",
    "pattern_words",
    "tail_int",
    "text_word",
]

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

TraceFormat = Literal["tid@epoch", "iso8601"]

# Zero bytes after the last line, so that 8-byte loads near its end stay inside the buffer.
_PAD = 64

_LOW = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_SEVEN = np.uint64(0x7F7F7F7F7F7F7F7F)
_ZEROS = np.uint64(0x3030303030303030)


def text_word(text: bytes) -> np.uint64:
    """Up to eight bytes of text as the ``uint64`` a load of them gives (zero-filled)."""
    return np.uint64(int.from_bytes(text.ljust(8, b"\0"), "little"))


def _low_bytes_mask(n: int) -> int:
    return (1 << (8 * n)) - 1 if n < 8 else (1 << 64) - 1


def pattern_words(text: bytes) -> list[tuple[np.uint64, np.uint64]]:
    """``text`` as (word, mask of its bytes) per eight bytes, for comparing loads with it."""
    words = []
    for i in range(0, len(text), 8):
        part = text[i : i + 8]
        words.append((text_word(part), np.uint64(_low_bytes_mask(len(part)))))
    return words


# _REQ_HIGH[n]: the 0x80 flag of each of the n lowest bytes.
_REQ_HIGH = np.array([int(_HIGH) & _low_bytes_mask(n) for n in range(9)], dtype=np.uint64)


def _range_flags(w: U64, lo: int, hi: int) -> U64:
    """0x80 in every byte of ``w`` that is within ``lo..hi`` (ASCII), else 0."""
    b7 = w & _SEVEN
    ge_lo = (b7 + np.uint64((0x80 - lo) * 0x0101010101010101)) & _HIGH
    ge_hi = (b7 + np.uint64((0x80 - hi - 1) * 0x0101010101010101)) & _HIGH
    return ge_lo & ~ge_hi & ~w & _HIGH


def _digit_flags(w: U64) -> U64:
    return _range_flags(w, 0x30, 0x39)


def _hex_flags(w: U64) -> U64:
    return _range_flags(w, 0x30, 0x39) | _range_flags(w, 0x61, 0x66)


def _first_flagged_byte(m: U64) -> I64:
    """Index (0..7) of the lowest byte with its 0x80 flag set in ``m``; 8 when none."""
    lowest = m & (~m + np.uint64(1))
    return (np.bitwise_count(lowest - np.uint64(1)).astype(np.int64)) >> 3


def _dec8(w: U64) -> U64:
    """Value of eight ASCII digits."""
    v = w - _ZEROS
    v = (v * np.uint64(10) + (v >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v * np.uint64(100) + (v >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return (v * np.uint64(10000) + (v >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def _hex8(w: U64) -> U64:
    """Value of eight ASCII hex digits (lowercase)."""
    n = ((w & np.uint64(0x0F0F0F0F0F0F0F0F)) + np.uint64(9) * ((w >> np.uint64(6)) & _LOW)) & (
        np.uint64(0x0F0F0F0F0F0F0F0F)
    )
    n = ((n & np.uint64(0x000F000F000F000F)) << np.uint64(4)) | (
        (n >> np.uint64(8)) & np.uint64(0x000F000F000F000F)
    )
    n = ((n & np.uint64(0x000000FF000000FF)) << np.uint64(8)) | (
        (n >> np.uint64(16)) & np.uint64(0x000000FF000000FF)
    )
    return ((n & np.uint64(0xFFFF)) << np.uint64(16)) | ((n >> np.uint64(32)) & np.uint64(0xFFFF))


def _byte(w: U64, i: int) -> U64:
    return (w >> np.uint64(8 * i)) & np.uint64(0xFF)


def _days_from_civil(y: I64, m: I64, d: I64) -> I64:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return np.asarray(era * 146097 + doe - 719468, dtype=np.int64)


class Lines:
    """One chunk of complete lines, with the views every decoder needs."""

    def __init__(self, pieces: list[memoryview]) -> None:
        n = sum(len(p) for p in pieces)
        # One copy into a buffer with zero padding, so that 8-byte loads near
        # the end of the last line stay inside it.
        self.mem: U8 = np.empty(n + _PAD, dtype=np.uint8)
        at = 0
        for piece in pieces:
            self.mem[at : at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            at += len(piece)
        self.mem[n:] = 0
        # Every byte offset as the start of an unaligned little-endian uint64.
        self.words: U64 = np.ndarray(
            (n + _PAD - 8,), dtype="<u8", buffer=self.mem, offset=0, strides=(1,)
        )
        self.ends: I64 = np.flatnonzero(self.mem[:n] == 10)
        self.starts: I64 = np.empty_like(self.ends)
        if self.ends.size:
            self.starts[0] = 0
            self.starts[1:] = self.ends[:-1] + 1

    def text(self, start: int, end: int) -> bytes:
        """The bytes ``start:end`` of the chunk."""
        return self.mem[start:end].tobytes()


# ---------------------------------------------------------------------------
# Record headers


class RecordHeaders(NamedTuple):
    """The record lines of a chunk (lines with a timestamp header), in file order.

    ``line_pos``: 1-based line number within the chunk; ``name_pos``: offset of
    the event name; ``ts``: time in ns since the epoch; ``eol``: offset of the
    line's end, before any ``\\r``.  ``format``: the header most of them have
    (``None`` without records).  ``untimestamped``: lines that start with a
    post-copy event name but have no header; ``malformed``: other nonblank
    lines without a header.
    """

    line_pos: I64
    name_pos: I64
    ts: I64
    eol: I64
    format: TraceFormat | None
    untimestamped: int
    malformed: int


def find_records(lines: Lines) -> RecordHeaders:
    """Find the record lines of a chunk and decode their headers."""
    words, mem = lines.words, lines.mem
    starts, ends = lines.starts, lines.ends
    # Strip a '\r' before '\n' so the last field sees the same terminator.
    eol = ends - ((ends > starts) & (mem[np.maximum(ends - 1, 0)] == 13))
    nonblank = eol > starts
    w0 = words[starts]
    # --- "TID@SEC.USEC:" --------------------------------------------------------
    # Bytes equal to '@' become 0 after the xor.
    at_byte = _first_flagged_byte(_range_flags(w0 ^ np.uint64(0x4040404040404040), 0, 0))
    digits0 = _digit_flags(w0)
    ok72 = (
        nonblank
        & (at_byte >= 1)
        & (at_byte <= 7)
        & ((digits0 & _REQ_HIGH[np.minimum(at_byte, 8)]) == _REQ_HIGH[np.minimum(at_byte, 8)])
    )
    at = starts + at_byte
    s1 = words[at + 1]
    s3 = words[at + 3]
    t11 = words[at + 11]
    ok72 &= (
        (_digit_flags(s1) == _HIGH)
        & (_digit_flags(s3) == _HIGH)
        & (_byte(t11, 0) == 0x2E)
        & (_byte(t11, 7) == 0x3A)
        & ((_digit_flags(t11) & np.uint64(0x0080808080808000)) == np.uint64(0x0080808080808000))
        & (at + 19 <= eol)
    )
    idx72 = np.flatnonzero(ok72)
    sec = _dec8(s3[idx72]) + (
        (_byte(s1[idx72], 0) - np.uint64(48)) * np.uint64(10)
        + (_byte(s1[idx72], 1) - np.uint64(48))
    ) * np.uint64(100_000_000)
    usec = _dec8(
        ((t11[idx72] >> np.uint64(8)) & np.uint64(0xFFFFFFFFFFFF)) << np.uint64(16)
        | np.uint64(0x3030)
    )
    ts72 = (sec.astype(np.int64) * 1_000_000 + usec.astype(np.int64)) * 1000
    name72 = at[idx72] + 19
    # --- "YYYY-MM-DDTHH:MM:SS[.ffffff]Z " ------------------------------------------------
    rest = np.flatnonzero(~ok72 & nonblank)
    idx_iso, name_iso, ts_iso = _iso_headers(words, starts[rest], eol[rest])
    idx_iso = rest[idx_iso]
    fmt: TraceFormat | None = None
    if idx72.size or idx_iso.size:
        fmt = "tid@epoch" if idx72.size >= idx_iso.size else "iso8601"
    # --- everything else -------------------------------------------------------------------
    bad = np.ones(starts.size, dtype=np.bool_)
    bad[idx72] = False
    bad[idx_iso] = False
    bad &= nonblank
    nbad = int(np.count_nonzero(bad))
    n_untimestamped = 0
    if nbad:
        first = w0[bad]
        untimestamped = (first == text_word(b"postcopy")) | (first == text_word(b"mark_pos"))
        n_untimestamped = int(np.count_nonzero(untimestamped))
    line_idx = np.concatenate([idx72, idx_iso])
    name_pos = np.concatenate([name72, name_iso])
    ts = np.concatenate([ts72, ts_iso])
    order = np.argsort(line_idx, kind="stable")
    line_idx = line_idx[order]
    return RecordHeaders(
        line_pos=line_idx + 1,
        name_pos=name_pos[order],
        ts=ts[order],
        eol=eol[line_idx],
        format=fmt,
        untimestamped=n_untimestamped,
        malformed=nbad - n_untimestamped,
    )


def _iso_headers(words: U64, starts: I64, eol: I64) -> tuple[I64, I64, I64]:
    if starts.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    w0, w8, w16, w20 = words[starts], words[starts + 8], words[starts + 16], words[starts + 20]
    d0, d8, d16, d20 = _digit_flags(w0), _digit_flags(w8), _digit_flags(w16), _digit_flags(w20)

    def has(flags: U64, *positions: int) -> Bools:
        need = np.uint64(sum(0x80 << (8 * p) for p in positions))
        return np.asarray((flags & need) == need)

    ok = (
        has(d0, 0, 1, 2, 3, 5, 6)
        & (_byte(w0, 4) == 0x2D)
        & (_byte(w0, 7) == 0x2D)
        & has(d8, 0, 1, 3, 4, 6, 7)
        & (_byte(w8, 2) == 0x54)
        & (_byte(w8, 5) == 0x3A)
        & (_byte(w16, 0) == 0x3A)
        & has(d16, 1, 2)
    )
    frac = (
        (_byte(w16, 3) == 0x2E)
        & has(d20, 0, 1, 2, 3, 4, 5)
        & (_byte(w20, 6) == 0x5A)
        & (_byte(w20, 7) == 0x20)
    )
    whole = (_byte(w16, 3) == 0x5A) & (_byte(w20, 0) == 0x20)
    ok &= frac | whole
    name = starts + np.where(frac, 28, 21)
    ok &= name <= eol
    idx = np.flatnonzero(ok)
    w0, w8, w16, w20, frac = w0[idx], w8[idx], w16[idx], w20[idx], frac[idx]

    def num(w: U64, *positions: int) -> I64:
        value = np.zeros(w.size, dtype=np.int64)
        for p in positions:
            value = value * 10 + (_byte(w, p).astype(np.int64) - 48)
        return value

    days = _days_from_civil(num(w0, 0, 1, 2, 3), num(w0, 5, 6), num(w8, 0, 1))
    secs = days * 86400 + num(w8, 3, 4) * 3600 + num(w8, 6, 7) * 60 + num(w16, 1, 2)
    usec = np.where(frac, num(w20, 0, 1, 2, 3, 4, 5), 0)
    return idx, name[idx], (secs * 1_000_000 + usec) * 1000


# ---------------------------------------------------------------------------
# Fields


def parse_hex(lines: Lines, at: I64, eol: I64 | None) -> tuple[U64, Bools]:
    """Hex numbers (1..16 digits, no "0x") starting at ``at``; also returns validity.

    A number ends at a space, ',', '\\r' or the end of the line.
    """
    if at.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.bool_)
    words = lines.words
    wa, wb = words[at], words[at + 8]
    la = _first_flagged_byte(~_hex_flags(wa) & _HIGH)
    lb = _first_flagged_byte(~_hex_flags(wb) & _HIGH)
    length = np.where(la < 8, la, 8 + lb)
    term = lines.mem[at + length]
    ok = (
        (length >= 1)
        & (length <= 16)
        & ((term == 0x20) | (term == 0x2C) | (term == 0x0D) | (term == 0x0A))
    )
    if eol is not None:
        ok &= at + length <= eol
    full = (_hex8(wa) << np.uint64(32)) | _hex8(wb)
    shift = np.uint64(4) * (np.uint64(16) - np.where(ok, length, 16).astype(np.uint64))
    return full >> shift, ok


def tail_int(
    lines: Lines, end: I64, marker: bytes, *, signed: bool = False
) -> tuple[I64, Bools, I64]:
    """The decimal number (1..7 digits, ``-`` allowed if ``signed``) ending at ``end``
    right after ``marker`` (at most 8 bytes).

    Returns the values, their validity and where each marker starts.
    """
    if end.size == 0:
        z = np.zeros(0, np.int64)
        return z, np.zeros(0, np.bool_), z
    w = lines.words[np.maximum(end - 8, 0)]
    nondigit = ~_digit_flags(w) & _HIGH
    # Highest non-digit byte: the float exponent of the flag word is exact here
    # because only bits 7, 15, ..., 63 can be set.
    _, exp = np.frexp(nondigit.astype(np.float64))
    top = np.where(nondigit == 0, -1, (exp.astype(np.int64) - 1) >> 3)
    ndig = 7 - top
    neg = np.zeros(end.size, dtype=np.bool_)
    if signed:
        neg = lines.mem[np.maximum(end - ndig - 1, 0)] == 0x2D
    marker_at = end - ndig - neg - len(marker)
    ok = (ndig >= 1) & (ndig <= 7) & ends_with(lines, marker_at + len(marker), marker)
    pad = np.where(ok, 8 - ndig, 1).astype(np.uint64) * np.uint64(8)
    keep = ~((np.uint64(1) << pad) - np.uint64(1))
    value = _dec8((w & keep) | (_ZEROS & ~keep)).astype(np.int64)
    value = np.where(neg, -value, value)
    return np.where(ok, value, -1), ok, marker_at


def ends_with(lines: Lines, end: I64, text: bytes) -> Bools:
    """Whether the bytes just before ``end`` are ``text`` (at most 16 bytes)."""
    ok = np.ones(end.size, dtype=np.bool_)
    for i, (value, mask) in enumerate(pattern_words(text)):
        at = end - len(text) + 8 * i
        ok &= ((lines.words[np.maximum(at, 0)] & mask) == value) & (at >= 0)
    return ok
