"""Block checksums of trace format 1.1: (byte length, 64-bit hash) of a column block's bytes.

The bytes of a block (C order) are read as little-endian 64-bit words, the last one zero-padded. Four lanes
take words i = 4m + j in turn, each through the multiply-rotate round of xxHash64 (acc = rotl(acc + w * P2,
31) * P1); the lanes are merged and the result is avalanched. Any change in any bit of any word, and any move
of words, changes the hash with near certainty (a plain sum, or a Fletcher sum mod 2**64, misses swaps of high
bytes). It is an integrity check against corruption, not a MAC. A Numba kernel computes it (about 18 GB/s on
an idle core), with `checksum_numpy` as its plain NumPy reference.
"""

from __future__ import annotations

import hashlib

import numpy as np
from numba import njit

ALGORITHM = "mix64"
P1 = np.uint64(0x9E3779B185EBCA87)
P2 = np.uint64(0xC2B2AE3D27D4EB4F)
P3 = np.uint64(0x165667B19E3779F9)
SEEDS = (np.uint64(0x60EA27EEADC0B5D6), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0),
         np.uint64(0x61C8864E7A143579))


@njit(cache=True, nogil=True, inline="always")
def _rotl(x: np.uint64, r: int) -> np.uint64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(cache=True, nogil=True, inline="always")
def _round(acc: np.uint64, w: np.uint64) -> np.uint64:
    return _rotl(acc + w * P2, 31) * P1


@njit(cache=True, nogil=True, inline="always")
def _finish(a0: np.uint64, a1: np.uint64, a2: np.uint64, a3: np.uint64, n: int) -> np.uint64:
    h = _rotl(a0, 1) + _rotl(a1, 7) + _rotl(a2, 12) + _rotl(a3, 18) + np.uint64(n)
    h ^= h >> np.uint64(33)
    h *= P2
    h ^= h >> np.uint64(29)
    h *= P3
    h ^= h >> np.uint64(32)
    return h


@njit(cache=True, nogil=True)
def _hash(words: np.ndarray) -> np.uint64:
    n = words.shape[0]
    a0, a1, a2, a3 = SEEDS
    full = n - n % 4
    for i in range(0, full, 4):  # four independent chains keep the multipliers busy
        a0 = _round(a0, words[i])
        a1 = _round(a1, words[i + 1])
        a2 = _round(a2, words[i + 2])
        a3 = _round(a3, words[i + 3])
    for i in range(full, n):
        a0 = _round(a0, words[i])
    return _finish(a0, a1, a2, a3, n)


def _words(values: np.ndarray) -> tuple[np.ndarray, int]:
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    pad = -raw.size % 8
    if pad:
        raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
    return raw.view("<u8"), int(values.nbytes)


def checksum(values: np.ndarray) -> tuple[int, int]:
    """(byte length, hash) of an array's bytes."""
    words, nbytes = _words(values)
    return nbytes, int(_hash(words))


@njit(cache=True, nogil=True)
def _hash_rows(words: np.ndarray) -> np.ndarray:
    out = np.empty(words.shape[0], dtype=np.uint64)
    for b in range(words.shape[0]):
        out[b] = _hash(words[b])
    return out


def block_checksums(values: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    """checksum() of each block of block_rows rows of values, in order (the last block may be shorter). The
    full blocks go through one kernel call (no Python between blocks) when their bytes are whole words."""
    rows = values.shape[0]
    full = rows // block_rows
    block_bytes = values[:block_rows].nbytes if rows else 0
    out: list[tuple[int, int]] = []
    if full and block_bytes % 8 == 0:
        words = np.ascontiguousarray(values[:full * block_rows]).reshape(-1).view("<u8")
        out = [(block_bytes, int(h)) for h in _hash_rows(words.reshape(full, block_bytes // 8))]
    else:
        full = 0
    out += [checksum(values[r:r + block_rows]) for r in range(full * block_rows, rows, block_rows)]
    return out


def checksum_numpy(values: np.ndarray) -> tuple[int, int]:
    """Plain NumPy reference of `checksum`: the four lanes as one uint64 vector, a step per 4 words."""
    words, nbytes = _words(values)
    n = words.size
    full = n - n % 4
    lanes = np.array(SEEDS, dtype=np.uint64)
    rot = np.array([1, 7, 12, 18], dtype=np.uint64)

    def rotl(x, r):
        return (x << np.uint64(r)) | (x >> np.uint64(64 - r))

    with np.errstate(over="ignore"):
        for row in words[:full].reshape(-1, 4):
            lanes = rotl(lanes + row * P2, 31) * P1
        for w in words[full:]:
            lanes[0] = rotl(lanes[0] + w * P2, 31) * P1
        h = np.uint64(((lanes << rot) | (lanes >> (np.uint64(64) - rot))).sum(dtype=np.uint64) + np.uint64(n))
        for shift, prime in ((33, P2), (29, P3)):
            h = np.uint64((h ^ (h >> np.uint64(shift))) * prime)
        h ^= h >> np.uint64(32)
    return nbytes, int(h)


def text_digest(text: str | bytes) -> str:
    """SHA-256 hex of a small header (metadata JSON, row counts): not on the hot path."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


class BlockSums:
    """The writer's side: checksums of consecutive blocks of `block_rows` rows per column, over appended
    chunks.

    Rows of the last, partly filled block are kept (copied, at most block_rows) until the block fills up.
    """

    def __init__(self, fields: list[str], block_rows: int):
        self.fields = fields
        self.block_rows = block_rows
        self.tail: dict[str, list[np.ndarray]] = {n: [] for n in fields}
        self.tail_rows = 0

    def resume(self, num_tokens: int, tail_values: dict[str, np.ndarray]) -> None:
        """Continue a file of num_tokens rows whose last block holds tail_values."""
        self.tail = {n: [np.array(tail_values[n])] for n in self.fields}
        self.tail_rows = num_tokens % self.block_rows

    def add(self, chunk) -> list[list[tuple[int, int]]]:
        """Take a chunk's rows; return the checksums [block][column] of the blocks it completed."""
        done = []
        n, pos = chunk.num_tokens, 0
        while pos < n:
            take = min(n - pos, self.block_rows - self.tail_rows)
            for name in self.fields:
                self.tail[name].append(getattr(chunk, name)[pos:pos + take])
            self.tail_rows += take
            pos += take
            if self.tail_rows == self.block_rows:
                done.append([checksum(_joined(self.tail[name])) for name in self.fields])
                self.tail = {name: [] for name in self.fields}
                self.tail_rows = 0
        for name in self.fields:  # the caller may reuse its buffers: keep our own copy of the tail rows
            self.tail[name] = [np.array(_joined(self.tail[name]))] if self.tail[name] else []
        return done

    def tail_sums(self) -> list[tuple[int, int]]:
        """Checksums of the partly filled last block, (0, 0) per column when it is empty."""
        if not self.tail_rows:
            return [(0, 0)] * len(self.fields)
        return [checksum(_joined(self.tail[name])) for name in self.fields]


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
