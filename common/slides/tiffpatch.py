"""Struct-level reading and in-place patching of TIFF directories, classic or BigTIFF,
either byte order, as de-identification needs it: entries and where they sit in the
file, the byte ranges an IFD's image data and values occupy, and writes that never move
or re-encode anything else. ``Guard`` refuses any zeroing that would touch bytes the
kept image still needs."""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import BinaryIO

from hepato.common.exceptions import InvalidSlide

Range = tuple[int, int]  # (file position, length)

_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_TYPE_SIZE |= {13: 4, 16: 8, 17: 8, 18: 8}
_UINT = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}
SUBIFDS = 330
# IFDs that hang off a tag rather than the chain; what they hold is metadata only.
POINTER_IFDS = {34665: "ExifIFD", 34853: "GPSIFD", 40965: "InteroperabilityIFD"}
_DATA_TAGS = ((273, 279), (324, 325), (513, 514))  # strips, tiles, old-style JPEG


@dataclass(frozen=True)
class Entry:
    code: int
    dtype: int
    count: int
    at: int  # position of the directory entry itself
    value_at: int  # position of the value: inside the entry when inline
    size: int
    inline: bool


class Guard:
    """Byte ranges the kept image needs; zeroing one of them is refused."""

    def __init__(self, ranges: list[Range]) -> None:
        merged: list[list[int]] = []
        for pos, n in sorted(ranges):
            if merged and pos <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], pos + n)
            else:
                merged.append([pos, pos + n])
        self.starts = [a for a, _ in merged]
        self.ends = [b for _, b in merged]

    def hits(self, pos: int, n: int) -> bool:
        i = bisect.bisect_right(self.starts, pos + n - 1) - 1
        return i >= 0 and self.ends[i] > pos

    def zero(self, tiff: TiffPatch, pos: int, n: int) -> None:
        if self.hits(pos, n):
            raise InvalidSlide("data to remove shares bytes with the kept image")
        tiff.write(pos, bytes(n))


class TiffPatch:
    """The directory structure of a TIFF opened read-write, read and patched in place."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.size = os.fstat(f.fileno()).st_size
        head = self.read(0, 8)
        if head[:2] not in (b"II", b"MM"):
            raise InvalidSlide("not a TIFF file")
        self.bo = "<" if head[:2] == b"II" else ">"
        self.big = struct.unpack(self.bo + "H", head[2:4])[0] == 43
        self.word, self.nsize = (8, 8) if self.big else (4, 2)
        self.wfmt, self.nfmt = ("Q", "Q") if self.big else ("I", "H")
        self.esize = 20 if self.big else 12
        self.first_at = 8 if self.big else 4  # where the first IFD's offset is stored

    def read(self, pos: int, n: int) -> bytes:
        self.f.seek(pos)
        data = self.f.read(n)
        if len(data) != n:
            raise InvalidSlide("a TIFF structure points past the end of the file")
        return data

    def num(self, fmt: str, pos: int) -> int:
        return int(struct.unpack(self.bo + fmt, self.read(pos, struct.calcsize(fmt)))[0])

    def write(self, pos: int, data: bytes) -> None:
        self.f.seek(pos)
        self.f.write(data)

    def put(self, fmt: str, pos: int, value: int) -> None:
        self.write(pos, struct.pack(self.bo + fmt, value))

    def ifd(self, offset: int) -> tuple[list[Entry], int]:
        """The entries of the IFD at ``offset`` and where its next-IFD offset is stored."""
        n = self.num(self.nfmt, offset)
        if n > 4096:
            raise InvalidSlide(f"a TIFF directory claims {n} entries (damaged file)")
        entries = []
        for i in range(n):
            at = offset + self.nsize + i * self.esize
            code, dtype = struct.unpack(self.bo + "HH", self.read(at, 4))
            count = self.num(self.wfmt, at + 4)
            size = _TYPE_SIZE.get(dtype, 1) * count
            value_at = at + 4 + self.word
            inline = size <= self.word
            if not inline:
                value_at = self.num(self.wfmt, value_at)
            entries.append(Entry(code, dtype, count, at, value_at, size, inline))
        return entries, offset + self.nsize + n * self.esize

    def block(self, offset: int) -> Range:
        """The bytes of the IFD itself: entry count, entries, next-IFD offset."""
        return offset, self.ifd(offset)[1] + self.word - offset

    def chain(self, offset: int) -> list[int]:
        """The IFD at ``offset`` and those linked after it."""
        out: list[int] = []
        while offset:
            if offset in out or len(out) > 100_000 or offset >= self.size:
                raise InvalidSlide("the TIFF directory chain loops or leaves the file")
            out.append(offset)
            offset = self.num(self.wfmt, self.ifd(offset)[1])
        return out

    def main_chain(self) -> list[int]:
        return self.chain(self.num(self.wfmt, self.first_at))

    def uints(self, e: Entry) -> list[int]:
        if e.dtype not in _UINT:
            raise InvalidSlide(f"TIFF tag {e.code} has an unexpected type {e.dtype}")
        fmt = f"{self.bo}{e.count}{_UINT[e.dtype]}"
        return list(struct.unpack(fmt, self.read(e.value_at, e.size)))

    def tree(self, offset: int) -> list[int]:
        """An IFD and every SubIFD below it."""
        out = [offset]
        for e in self.ifd(offset)[0]:
            if e.code == SUBIFDS:
                for sub in self.uints(e):
                    out += [o for first in self.chain(sub) for o in self.tree(first)]
        return out

    def ranges(self, offset: int, skip: Collection[int] = ()) -> tuple[list[Range], list[Range]]:
        """(image data, directory block and out-of-line values) of an IFD, leaving out the
        values of the tags in ``skip``."""
        entries = self.ifd(offset)[0]
        by_code = {e.code: e for e in entries}
        data: list[Range] = []
        for off_tag, len_tag in _DATA_TAGS:
            if off_tag in by_code and len_tag in by_code:
                pairs = zip(self.uints(by_code[off_tag]), self.uints(by_code[len_tag]), strict=True)
                data += [(o, n) for o, n in pairs if n]
        meta = [self.block(offset)]
        meta += [(e.value_at, e.size) for e in entries if not e.inline and e.code not in skip]
        return data, meta

    def pointer_ifd(self, offset: int) -> list[Range]:
        """Everything an EXIF, GPS or Interoperability IFD holds (to be zeroed, which
        leaves an empty IFD behind for the tag that points to it)."""
        if not offset:
            return []
        entries = self.ifd(offset)[0]
        out = [self.block(offset)]
        for e in entries:
            if e.code in POINTER_IFDS:
                out += self.pointer_ifd(self.uints(e)[0])
            elif not e.inline:
                out.append((e.value_at, e.size))
        return out

    def set_ascii(self, e: Entry, text: bytes, guard: Guard) -> None:
        """Replace an ASCII value: inside the entry when it fits there, over the old value
        (NUL-padded) when not longer, else appended at the end of the file."""
        data = text + b"\0"
        old = None if e.inline else (e.value_at, e.size)
        if len(data) <= self.word:
            self.write(e.at + 4 + self.word, data.ljust(self.word, b"\0"))
        elif old and len(data) <= e.size:
            guard.zero(self, *old)
            self.write(e.value_at, data)
            old = None
        else:
            at = self.size + self.size % 2
            if not self.big and at + len(data) >= 2**32:
                raise InvalidSlide("a classic TIFF has no room left for a rewritten value")
            self.write(at, data)
            self.size = at + len(data)
            self.put(self.wfmt, e.at + 4 + self.word, at)
        if old:
            guard.zero(self, *old)
        self.put(self.wfmt, e.at + 4, len(data))
