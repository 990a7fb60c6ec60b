"""Local-file helpers shared by the overlay and the hydration target.

A ``Bitmap`` that remembers which of its 4 KiB pages changed (so a flush rewrites only those),
``punch_hole``/``zero_range`` through ``fallocate(2)`` (Python's os module has no flags for
it), and an exclusive ``flock`` so that two servers never write the same overlay or target.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import threading

from lifeboat.archive.durable import pwrite_all
from lifeboat.archive.errors import Locked

PAGE = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_BLOCK = bytes(1024 * 1024)
_NOT_FULL = re.compile(rb"[^\xff]")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """``a`` rounded up to a multiple of ``b``."""
    return ceil_div(a, b) * b


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with flags; raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Zeros written as data (for block devices and file systems without hole punching)."""
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, memoryview(_ZERO_BLOCK)[: min(len(_ZERO_BLOCK), end - offset)], offset)
        offset += n


def punch_hole(fd: int, offset: int, length: int, *, keep_allocated: bool = False) -> None:
    """Make a range read as zeros, freeing its blocks (or, with ``keep_allocated``, keeping
    them provisioned as NBD_CMD_FLAG_NO_HOLE asks); falls back to writing zeros."""
    if length <= 0:
        return
    mode = FALLOC_FL_ZERO_RANGE if keep_allocated else FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    try:
        fallocate(fd, mode, offset, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            raise
        write_zeros(fd, offset, length)


def data_runs(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """``(offset, length, is_hole)`` runs of a file range, from SEEK_DATA/SEEK_HOLE."""
    end = offset + length
    runs: list[tuple[int, int, bool]] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                return [(offset, length, False)]
            data = end
        if data > pos:
            runs.append((pos, min(data, end) - pos, True))
            pos = min(data, end)
            if pos >= end:
                break
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        runs.append((pos, hole - pos, False))
        pos = hole
    return runs


def lock_file(fd: int, what: str) -> None:
    """Hold an exclusive lock on ``fd`` for the life of the process, or raise ``Locked``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Locked(f"{what} is in use by another lifeboat process") from None


class Bitmap:
    """One bit per block (LSB first), thread-safe, tracking which pages changed since the
    last ``take_dirty``. Bits are only ever set, never cleared: that is what makes writing a
    page in place safe against a torn write (see the overlay's write order)."""

    def __init__(self, nbits: int, data: bytes | None = None) -> None:
        self.nbits = nbits
        nbytes = -(-nbits // 8)
        self.bits = bytearray(data[:nbytes]) if data is not None else bytearray(nbytes)
        if len(self.bits) < nbytes:
            self.bits.extend(bytes(nbytes - len(self.bits)))
        self.count = sum(bin(b).count("1") for b in self.bits) if data is not None else 0
        self._dirty: set[int] = set()
        self.lock = threading.Lock()

    def __getitem__(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def set(self, i: int) -> bool:
        """Set bit ``i``; whether it was clear before. Caller holds ``lock`` or accepts races."""
        byte = i >> 3
        mask = 1 << (i & 7)
        if self.bits[byte] & mask:
            return False
        self.bits[byte] |= mask
        self.count += 1
        self._dirty.add(byte // PAGE)
        return True

    def set_range(self, first: int, last: int) -> None:
        """Set bits ``first..last`` inclusive."""
        with self.lock:
            for i in range(first, last + 1):
                self.set(i)

    def any_in(self, first: int, last: int) -> bool:
        """Whether any bit in ``first..last`` is set."""
        if self.count == 0:
            return False
        for i in range(first, last + 1):
            if self.bits[i >> 3] >> (i & 7) & 1:
                return True
        return False

    def all_in(self, first: int, last: int) -> bool:
        """Whether every bit in ``first..last`` is set."""
        if self.count == self.nbits:
            return True
        for i in range(first, last + 1):
            if not self.bits[i >> 3] >> (i & 7) & 1:
                return False
        return True

    def first_clear(self, start: int = 0) -> int | None:
        """The lowest clear bit at or after ``start`` (C-speed scan), or None."""
        if self.count == self.nbits:
            return None
        pos = start >> 3
        while True:
            m = _NOT_FULL.search(self.bits, pos)
            if m is None:
                return None
            byte = m.start()
            for bit in range(8):
                i = byte * 8 + bit
                if i >= self.nbits:
                    return None
                if i >= start and not self.bits[byte] >> bit & 1:
                    return i
            pos = byte + 1

    @property
    def full(self) -> bool:
        """Every bit is set."""
        return self.count == self.nbits

    def take_dirty(self) -> list[tuple[int, bytes]]:
        """``(byte offset, page bytes)`` of every page changed since the last call."""
        with self.lock:
            pages = sorted(self._dirty)
            self._dirty.clear()
            return [(p * PAGE, bytes(self.bits[p * PAGE : (p + 1) * PAGE])) for p in pages]

    def mark_all_dirty(self) -> None:
        """Have the next ``take_dirty`` return every page."""
        with self.lock:
            self._dirty.update(range(-(-len(self.bits) // PAGE)))

    def persist(self, data_fd: int, fd: int, offset: int) -> None:
        """fdatasync ``data_fd``, then write the changed pages into ``fd`` (the bitmap stored at
        ``offset``) and fdatasync it; on failure every page counts as changed again."""
        pages = self.take_dirty()
        try:
            os.fdatasync(data_fd)
            for off, page in pages:
                pwrite_all(fd, [page], offset + off)
            if pages:
                os.fdatasync(fd)
        except OSError:
            self.mark_all_dirty()
            raise
