"""A fast, restricted reader of torch.save files (the zip format) from other people's clusters.

torch.load(weights_only=True) interprets a file's pickle one opcode at a time in Python; an SGLang per_token
dump, whose token ids and positions are pickled as Python lists, spends about 2.8 s per million tokens there.
This reader interprets the same pickle under tighter rules:

- only opcodes torch's weights-only unpickler also accepts (no BUILD, NEWOBJ or sets), and only four globals:
  torch.save's tensor rebuild function, its typed storage classes and OrderedDict, each replaced by an inert
  stand-in of this module. Nothing the file names is imported or called. So it accepts a subset of what
  torch.load(weights_only=True) accepts; anything else raises Unsupported, and callers fall back to that
  loader, which accepts or refuses the file as before;
- runs of small-integer opcodes between MARK and APPENDS (a pickled list of ints) are decoded by one Numba
  pass into an int32 array, which such a list then becomes;
- tensors come back as TensorRef (dtype, shape, where the bytes are), read with pread only when asked, after
  their extent is checked against the storage's zip entry;
- with `stream`, the elements of the top-level dict's "records" list are yielded as each completes and dropped
  from the memo, so memory holds one record (and the pickle's pages, released as they are passed), whatever
  the file's size. A record may only reference objects it created itself (or immutable ones), so a record
  handed out can never change afterwards.

Shape legend: n bytes of pickle.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from numba import njit

STORAGE_DTYPES = {"ByteStorage": np.uint8, "CharStorage": np.int8, "ShortStorage": np.int16,
                  "IntStorage": np.int32, "LongStorage": np.int64, "BoolStorage": np.bool_,
                  "HalfStorage": np.float16, "FloatStorage": np.float32, "DoubleStorage": np.float64}
MAX_DEPTH = 32  # nesting this reader turns into arrays and lists; deeper files go to torch.load
RELEASE_BYTES = 8 << 20  # pickle pages handed back to the kernel in steps of this size while streaming


class Unsupported(Exception):
    """The file is outside what this reader handles; torch.load(weights_only=True) decides instead."""


@dataclass(frozen=True)
class StorageRef:
    dtype: np.dtype
    offset: int  # of the storage's bytes in the file
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the file, not yet read: storage[offset + sum(index * stride)]."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of storage a read takes (the span the tensor's indices cover)."""
        return _span(self.shape, self.stride) * self.dtype.itemsize

    def read(self, fd: int) -> np.ndarray:
        """The tensor's values as a new array (only its own bytes are read)."""
        item = self.dtype.itemsize
        span = _span(self.shape, self.stride)
        if span == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        count = int(np.prod(self.shape))
        flat = np.empty(span, dtype=self.dtype)  # read straight into it, no zero-filled buffer first
        into = cast(memoryview, flat.view(np.uint8).data)
        if os.preadv(fd, [into], self.storage.offset + self.offset * item) != flat.nbytes:
            raise Unsupported("the file is shorter than a tensor's storage")
        if span == count and self.stride == _contiguous(self.shape):
            return flat.reshape(self.shape)
        view = np.lib.stride_tricks.as_strided(flat, self.shape, [s * item for s in self.stride],
                                               writeable=False)
        return np.array(view)


def _span(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Storage elements from a tensor's first to its last (0 when it has none)."""
    if not all(shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


class _IntList(list[Any]):
    """A pickled list; `chunks` holds its values while they are only decoded integer runs."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[np.ndarray] | None = None

    def materialise(self) -> None:
        """Turn decoded runs into list items before Python items join them (keeps the order)."""
        if self.chunks:
            self.extend(np.concatenate(self.chunks).tolist())
        self.chunks = None


class _Global:
    def __init__(self, name: str):
        self.name = name


_REBUILD = _Global("torch._utils._rebuild_tensor_v2")
_ORDERED_DICT = _Global("collections.OrderedDict")


@njit(cache=True, nogil=True)
def decode_int_run(buf: np.ndarray, pos: int, out: np.ndarray) -> tuple[int, int]:
    """Decode consecutive BININT1 / BININT2 / BININT opcodes from buf[pos] into out; returns (count, position
    after them). Stops at any other byte, at a truncated opcode or when out is full."""
    n, count = buf.shape[0], 0
    while count < out.shape[0] and pos < n:
        op = buf[pos]
        if op == 75 and pos + 1 < n:  # K: 1-byte unsigned
            out[count] = buf[pos + 1]
            pos += 2
        elif op == 77 and pos + 2 < n:  # M: 2-byte unsigned
            out[count] = np.int32(buf[pos + 1]) | (np.int32(buf[pos + 2]) << 8)
            pos += 3
        elif op == 74 and pos + 4 < n:  # J: 4-byte signed
            v = (np.int64(buf[pos + 1]) | (np.int64(buf[pos + 2]) << 8) | (np.int64(buf[pos + 3]) << 16)
                 | (np.int64(buf[pos + 4]) << 24))
            out[count] = v - (1 << 32) if v >= (1 << 31) else v
            pos += 5
        else:
            break
        count += 1
    return count, pos


def decode_int_run_numpy(buf: np.ndarray, pos: int, limit: int) -> tuple[np.ndarray, int]:
    """Plain reference of decode_int_run, opcode by opcode through struct."""
    out: list[int] = []
    data = bytes(buf)
    while len(out) < limit and pos < len(data):
        op = data[pos]
        if op == 75 and pos + 1 < len(data):
            out.append(data[pos + 1])
            pos += 2
        elif op == 77 and pos + 2 < len(data):
            out.append(struct.unpack_from("<H", data, pos + 1)[0])
            pos += 3
        elif op == 74 and pos + 4 < len(data):
            out.append(struct.unpack_from("<i", data, pos + 1)[0])
            pos += 5
        else:
            break
    return np.array(out, dtype=np.int32), pos


class TorchZip:
    """One torch.save zip file: its pickle mapped read-only and its storages' places in the file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise Unsupported(f"not a torch zip file ({exc})") from exc
        size = self.size = path.stat().st_size
        self.fd = os.open(path, os.O_RDONLY)
        try:
            with archive:
                infos = archive.infolist()
                pickles = [i for i in infos if i.filename.endswith("/data.pkl")]
                if len(pickles) != 1:
                    raise Unsupported("not one data.pkl in the archive")
                self.prefix = pickles[0].filename[: -len("data.pkl")]
                self.entries = {i.filename[len(self.prefix):]: self._extent(i, size) for i in infos
                                if i.filename.startswith(self.prefix)}
                order = self.entries.get("byteorder")
                if order is not None and os.pread(self.fd, 8, order[0])[:order[1]] != b"little":
                    raise Unsupported("big-endian storages")
            start, length = self.entries["data.pkl"]
            self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            os.close(self.fd)
            raise
        self.pickle_start, self.pickle_length = start, length
        self.top: Any = None

    def _extent(self, info: zipfile.ZipInfo, size: int) -> tuple[int, int]:
        """(offset, length) of a stored entry's bytes, read from its local header."""
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise Unsupported("a compressed or encrypted entry")
        head = os.pread(self.fd, 30, info.header_offset)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise Unsupported("a damaged local header")
        name_len, extra_len = struct.unpack_from("<HH", head, 26)
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > size:
            raise Unsupported("an entry runs past the end of the file")
        return start, info.file_size

    def close(self) -> None:
        if self._map is not None:
            # a reader stopped by an error may still hold a view: the map then goes with it
            with contextlib.suppress(BufferError):
                self._map.close()
        os.close(self.fd)

    def __enter__(self) -> TorchZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def storage(self, pid: Any) -> StorageRef:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], np.dtype) or not isinstance(pid[2], str)
                or type(pid[4]) is not int):
            raise Unsupported("a persistent id that is not a typed storage")
        entry = self.entries.get(f"data/{pid[2]}")
        numel = pid[4]
        if entry is None or numel < 0 or numel * pid[1].itemsize > entry[1]:
            raise Unsupported("a storage larger than its entry")
        return StorageRef(pid[1], entry[0], numel)

    def load(self) -> Any:
        """The whole object, tensors read."""
        (top,) = self._run(stream=False, read_tensors=True)
        return top

    def records(self, read_tensors: bool = True) -> Iterator[Any]:
        """Each element of the top-level dict's "records" list as it completes (tensors as arrays, or as
        TensorRef without read_tensors); once they are exhausted, `top` holds the top-level object (tensors
        read), its "records" empty. A file without such a list yields nothing and `top` is all of it."""
        items = self._run(stream=True, read_tensors=read_tensors)
        for item, last in _with_last(items):
            if last:
                self.top = self._finish(item, True, 0)
            else:
                yield item

    def _run(self, stream: bool, read_tensors: bool) -> Iterator[Any]:
        if self._map is None:
            raise Unsupported("an empty file")
        buf = np.frombuffer(self._map, dtype=np.uint8, count=self.pickle_length, offset=self.pickle_start)
        machine = _Machine(self, buf, stream)
        try:
            for item in machine.run():
                yield self._finish(item, read_tensors, 0)
        finally:
            del buf, machine  # no view may outlive the map

    def _finish(self, obj: Any, read_tensors: bool, depth: int) -> Any:
        """Decoded runs to arrays, lists to plain lists, tensors read (with read_tensors). An object reached
        twice is copied twice, so the copies are bounded: no more nodes than the pickle has bytes and no more
        tensor bytes than the file has (a file that shares more goes to torch.load, which shares them)."""
        budget = [self.pickle_length, self.size]  # nodes, tensor bytes

        def finish(obj: Any, depth: int) -> Any:
            budget[0] -= 1
            if depth > MAX_DEPTH or budget[0] < 0:
                raise Unsupported("objects nested or shared more than this reader copies")
            if isinstance(obj, _IntList):
                if obj.chunks is not None and not len(obj):
                    return np.concatenate(obj.chunks) if obj.chunks else []
                obj.materialise()
                return [finish(x, depth + 1) for x in obj]
            if type(obj) is dict:
                return {k: finish(v, depth + 1) for k, v in obj.items()}
            if type(obj) is list:
                return [finish(x, depth + 1) for x in obj]
            if type(obj) is tuple:
                return tuple(finish(x, depth + 1) for x in obj)
            if isinstance(obj, TensorRef):
                budget[1] -= obj.nbytes
                if budget[1] < 0:
                    raise Unsupported("tensors that repeat more bytes than the file holds")
                return obj.read(self.fd) if read_tensors else obj
            if isinstance(obj, (StorageRef, _Global, np.dtype)):
                raise Unsupported("a storage or global outside a tensor")
            return obj

        return finish(obj, depth)


def _with_last(items: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    previous, have = None, False
    for item in items:
        if have:
            yield previous, False
        previous, have = item, True
    if have:
        yield previous, True


EMPTY_DICT = ord("}")
_MUTABLE = (dict, list, tuple)  # containers a record may not borrow from outside itself
_SCALARS = (str, int, float, bool, type(None))


class _Machine:
    """The pickle interpreter: the stack machine of the pickle protocol, restricted (module docstring)."""

    def __init__(self, archive: TorchZip, buf: np.ndarray, stream: bool):
        self.archive, self.buf, self.stream = archive, buf, stream
        self.pos = 0
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.memo_seq: dict[int, int] = {}  # memo key -> order in which it was stored
        self.puts = 0
        self.runs = np.empty(1 << 12, dtype=np.int32)
        self.records: _IntList | None = None  # the top-level "records" list, when streaming
        self.item_level = -1  # metastack depth of that list's items, while a MARK over it is open
        self.item_first_put = 0  # memo order where the record being built started
        self.item_keys: list[int] = []  # memo keys stored since then
        self.released = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > self.buf.shape[0]:
            raise Unsupported("the pickle is truncated")
        out = self.buf[self.pos:end].tobytes()
        self.pos = end
        return out

    def run(self) -> Iterator[Any]:
        ops = _OPS
        buf, n = self.buf, self.buf.shape[0]
        while True:
            if self.pos >= n:
                raise Unsupported("the pickle is truncated")
            op = int(buf[self.pos])
            self.pos += 1
            handler = ops.get(op)
            if handler is None:
                raise Unsupported(f"pickle opcode {op}")
            try:
                done = handler(self)
            except (IndexError, KeyError, TypeError, ValueError, struct.error, UnicodeDecodeError) as exc:
                raise Unsupported(f"a malformed pickle ({type(exc).__name__})") from exc
            if done is not None:
                yield done[0]
                return
            records = self.records
            if records is not None and (len(records) or (op == EMPTY_DICT and self._new_record())):
                yield from self._completed()

    def _new_record(self) -> bool:
        """A dict has just been pushed on the records' items, over a dict: that one is finished (a dict's
        keys and values go above it, so a dict right above one is never part of it)."""
        return (len(self.metastack) == self.item_level and len(self.stack) == 2
                and type(self.stack[0]) is dict)

    def _completed(self) -> Iterator[Any]:
        """Records that can no longer change: the record below a new one, and whatever an APPENDS put into
        the list."""
        assert self.records is not None
        if self._new_record():
            item = self.stack.pop(0)
            self._forget()
            self.item_first_put = self.puts
            yield item
        if len(self.records):
            items = list(self.records)
            self.records.clear()
            self._forget()
            self.item_first_put = self.puts
            yield from items
        if self.pos - self.released >= RELEASE_BYTES:
            self._release()

    def _forget(self) -> None:
        """Drop the memo entries a handed-out record created (the strings it shares stay)."""
        for key in self.item_keys:
            if not isinstance(self.memo.get(key), _SCALARS + (_Global, np.dtype)):
                self.memo.pop(key, None)
        self.item_keys = []

    def _release(self) -> None:
        """Give the pages of pickle already read back to the kernel (RSS stays flat)."""
        archive = self.archive
        assert archive._map is not None
        page = mmap.PAGESIZE
        start = (archive.pickle_start + self.released) // page * page
        end = (archive.pickle_start + self.pos) // page * page
        if end > start and hasattr(archive._map, "madvise"):
            archive._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        self.released = self.pos

    # ---- opcodes (each returns None, or (result,) at STOP)

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def op_mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []
        if self.stream and self.records is not None and self.metastack[-1] \
                and self.metastack[-1][-1] is self.records:
            self.item_level = len(self.metastack)
        if self.pos < self.buf.shape[0] and self.buf[self.pos] in (74, 75, 77):
            self._int_run()

    def _int_run(self) -> None:
        """MARK then a run of ints then APPENDS onto a list: the run becomes one int32 chunk."""
        start = self.pos
        chunks = []
        pos = start
        while True:
            count, pos = decode_int_run(self.buf, pos, self.runs)
            chunks.append(self.runs[:count].copy())
            if count < self.runs.shape[0]:
                break
        if pos < self.buf.shape[0] and self.buf[pos] == ord("e") and self.metastack[-1] \
                and type(self.metastack[-1][-1]) is _IntList and not len(self.metastack[-1][-1]):
            target = self.metastack[-1][-1]
            target.chunks = (target.chunks or []) + chunks
            self.stack = self.metastack.pop()
            self.pos = pos + 1
            return
        self.stack.extend(np.concatenate(chunks).tolist())  # a tuple's ints, a dict's values: plain items
        self.pos = pos

    def pop_mark(self) -> list[Any]:
        if len(self.metastack) == self.item_level:  # the records' items are done until the next MARK
            self.item_level = -1
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def op_empty_list(self) -> None:
        lst = _IntList()
        if (self.stream and self.records is None and len(self.metastack) == 1 and self.stack == ["records"]
                and len(self.metastack[0]) == 1 and type(self.metastack[0][0]) is dict):
            self.records = lst
        self.push(lst)

    def op_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not _IntList:
            raise Unsupported("APPENDS onto something that is not a list")
        target.materialise()
        target.extend(items)

    def op_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not _IntList:
            raise Unsupported("APPEND onto something that is not a list")
        target.materialise()
        target.append(value)

    def op_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not dict or len(items) % 2:
            raise Unsupported("SETITEMS onto something that is not a dict")
        for i in range(0, len(items), 2):
            target[_key(items[i])] = items[i + 1]

    def op_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        target = self.stack[-1]
        if type(target) is not dict:
            raise Unsupported("SETITEM onto something that is not a dict")
        target[_key(key)] = value

    def op_put(self, key: int) -> None:
        self.memo[key] = self.stack[-1]
        self.memo_seq[key] = self.puts
        self.puts += 1
        if self.item_level > 0:
            self.item_keys.append(key)

    def op_get(self, key: int) -> None:
        if key not in self.memo and key in self.memo_seq:  # a container of a record already handed out
            raise Unsupported("a record that shares a container with another")
        value = self.memo[key]
        if (self.item_level > 0 and len(self.metastack) >= self.item_level and isinstance(value, _MUTABLE)
                and self.memo_seq[key] < self.item_first_put):
            raise Unsupported("a record that shares a container with another")
        self.push(value)

    def op_global(self) -> None:
        end = self.buf.shape[0]
        line = bytes(self.buf[self.pos:min(end, self.pos + 256)])
        parts = line.split(b"\n", 2)
        if len(parts) < 3:
            raise Unsupported("a malformed GLOBAL")
        self.pos += len(parts[0]) + len(parts[1]) + 2
        module, name = parts[0].decode("ascii"), parts[1].decode("ascii")
        if module == "torch" and name in STORAGE_DTYPES:
            self.push(np.dtype(STORAGE_DTYPES[name]))
        elif (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            self.push(_REBUILD)
        elif (module, name) == ("collections", "OrderedDict"):
            self.push(_ORDERED_DICT)
        else:
            raise Unsupported(f"global {module}.{name}")

    def op_reduce(self) -> None:
        args, func = self.stack.pop(), self.stack.pop()
        if type(args) is not tuple:
            raise Unsupported("REDUCE without an argument tuple")
        if func is _ORDERED_DICT and not args:
            self.push({})
        elif func is _REBUILD:
            self.push(_rebuild(*args))
        else:
            raise Unsupported("REDUCE of something other than a tensor or an empty OrderedDict")

    def op_persid(self) -> None:
        self.push(self.archive.storage(self.stack.pop()))

    def op_tuple_n(self, n: int) -> None:
        if n:
            items = self.stack[-n:]
            if len(items) != n:
                raise Unsupported("a tuple longer than the stack")
            del self.stack[-n:]
        else:
            items = []
        self.push(tuple(items))

    def op_stop(self) -> tuple[Any]:
        if self.metastack or len(self.stack) != 1:
            raise Unsupported("STOP with a stack that is not one object")
        return (self.stack.pop(),)


def _key(key: Any) -> Any:
    if not isinstance(key, _SCALARS):
        raise Unsupported("a dict key that is not a plain value")
    return key


def _rebuild(storage: Any, offset: Any, shape: Any, stride: Any, requires_grad: Any, hooks: Any,
             metadata: Any = None) -> TensorRef:
    """torch._utils._rebuild_tensor_v2's stand-in: the tensor's place, checked to lie inside its storage."""
    if (not isinstance(storage, StorageRef) or type(offset) is not int or type(shape) is not tuple
            or type(stride) is not tuple or len(shape) != len(stride) or len(shape) > MAX_DEPTH
            or type(requires_grad) is not bool or hooks != {} or metadata not in (None, {})):
        raise Unsupported("a tensor this reader does not rebuild")
    if any(type(x) is not int or x < 0 for x in (offset, *shape, *stride)):
        raise Unsupported("a negative tensor size, stride or offset")
    if offset + _span(shape, stride) > storage.numel:
        raise Unsupported("a tensor outside its storage")
    return TensorRef(storage, offset, shape, stride)


def _fixed(fmt: str) -> Any:
    size = struct.calcsize(fmt)

    def op(m: _Machine) -> None:
        m.push(struct.unpack(fmt, m.take(size))[0])
    return op


def _unicode(m: _Machine) -> None:
    m.push(m.take(struct.unpack("<I", m.take(4))[0]).decode("utf-8", "surrogatepass"))


def _long1(m: _Machine) -> None:
    m.push(int.from_bytes(m.take(m.take(1)[0]), "little", signed=True))


def _proto(m: _Machine) -> None:
    if m.take(1)[0] != 2:
        raise Unsupported("a pickle protocol other than 2 (torch.save's)")


_OPS: dict[int, Any] = {
    ord("("): _Machine.op_mark, ord("]"): _Machine.op_empty_list, ord("e"): _Machine.op_appends,
    ord("a"): _Machine.op_append, ord("u"): _Machine.op_setitems, ord("s"): _Machine.op_setitem,
    ord("c"): _Machine.op_global, ord("R"): _Machine.op_reduce, ord("Q"): _Machine.op_persid,
    ord("."): _Machine.op_stop, 0x80: _proto,
    ord("}"): lambda m: m.push({}), ord(")"): lambda m: m.push(()),
    ord("N"): lambda m: m.push(None), 0x88: lambda m: m.push(True), 0x89: lambda m: m.push(False),
    ord("t"): lambda m: m.push(tuple(m.pop_mark())), 0x85: lambda m: m.op_tuple_n(1),
    0x86: lambda m: m.op_tuple_n(2), 0x87: lambda m: m.op_tuple_n(3),
    ord("K"): _fixed("<B"), ord("M"): _fixed("<H"), ord("J"): _fixed("<i"), ord("G"): _fixed(">d"),
    ord("X"): _unicode, 0x8A: _long1,
    ord("q"): lambda m: m.op_put(m.take(1)[0]), ord("h"): lambda m: m.op_get(m.take(1)[0]),
    ord("r"): lambda m: m.op_put(struct.unpack("<I", m.take(4))[0]),
    ord("j"): lambda m: m.op_get(struct.unpack("<I", m.take(4))[0]),
}
