"""Turning a result into bytes on disk and back, in a file that ``joblib.load`` reads.

Kept apart from :mod:`cachedload.store` (which decides *where* and *when*) so that the format
can be tuned or replaced without touching the publishing rules.

The file is a joblib pickle, laid out so that cachedload can restore it without running
joblib's pure-Python unpickler::

    PROTO 4
    BINBYTES8 <index> POP          joblib pushes the index and drops it; cachedload reads it
    GLOBAL cachedload.serialize._restore
    MARK
      BINBYTES8 <skeleton>         the result pickled by the C pickler, arrays left out by id
      <NumpyArrayWrapper> <padding> <raw bytes of array 0, 16-byte aligned>
      ...                          (one wrapper + raw bytes per array, exactly as joblib.dump)
    TUPLE REDUCE STOP              joblib.load calls _restore(skeleton, *arrays)

The index holds where each array's bytes start and its dtype, shape and order, so a hit reads
the index and the skeleton, memory-maps each array (``mmap_mode="r"``: constant time, whatever
the size) or reads it straight into a preallocated array (one copy, like ``np.load``), and
unpickles the skeleton with the C unpickler. Writing streams each array's buffer to the file
as it is (no copy per chunk) and hashes it on the way.

Compressed entries (``compress=...``) are plain ``joblib.dump`` output, read by ``joblib.load``.

``load(..., safe_types=...)`` (for entries someone else wrote) unpickles the index and the
skeleton with :class:`~cachedload.safe_pickle.RestrictedUnpickler`, and refuses any other file:
joblib's pure-Python unpickler runs joblib's own reconstruction of the arrays on fields the
pickle sets (and, before joblib 1.5, unpickled object arrays with no restriction at all), so a
compressed or joblib-written file cannot be loaded without trusting its writer.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import io
import os
import pickle
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
import xxhash

from cachedload.entry import HashingWriter
from cachedload.errors import UnsafePickleError
from cachedload.reading import SharedReader, read_exactly, read_parallel
from cachedload.safe_pickle import RestrictedUnpickler, restricted_loads
from cachedload.verified import open_regular

__all__ = [
    "ArrayExtent",
    "ArraySlot",
    "SlottedFile",
    "UnpicklableResult",
    "array_extents",
    "check_layout",
    "check_safe",
    "dump",
    "dump_slotted",
    "layout_problem",
    "load",
    "load_buffer",
    "load_open",
]

_MAGIC = b"cachedload-index\0"
_VERSION = 1
_ALIGN = 16  # joblib's NUMPY_ARRAY_ALIGNMENT_BYTES: what its reader expects
_BINBYTES8 = b"\x8e"
_HEAD = b"\x80\x04" + _BINBYTES8  # PROTO 4, then the index as a BINBYTES8
_RESTORE = b"ccachedload.serialize\n_restore\n("  # GLOBAL, MARK
_TAIL = b"tR."  # TUPLE, REDUCE, STOP
_U64 = struct.Struct("<Q")
_PROBE = 4096  # first read of a file: its head and, usually, the whole index
_WRITE_CHUNK = 8 * 1024 * 1024  # hash then write a slice while it is in the CPU cache
_KEPT_BYTES = 16 * 1024 * 1024  # at most this many bytes of pieces kept to hash later
_HASH_CHUNK = 256 * 1024  # reading back to hash: fits L2 (measured 7.8 ms for 61 MB vs 11.7)
#: A file being built is flushed to disk in the background after every this many bytes: the
#: writeback runs while the next rows are computed, not all in the final fsync (a 61 MB
#: result's took ~30 ms, all of it added to the build).
_EARLY_SYNC_BYTES = 16 * 1024 * 1024
_NDITER_BUFFER = 16 * 1024 * 1024  # non-contiguous arrays: joblib's chunk size
_SPOOL_MAX = 64 * 1024 * 1024  # a larger skeleton is pickled into a temporary file
_FOREIGN = ">" if sys.byteorder == "little" else "<"


# -- writing --------------------------------------------------------------------------------

# What pickle raises for an object it cannot write: TypeError ("cannot pickle '_thread.lock'
# object"), PicklingError (a class it cannot find by name), AttributeError ("Can't get local
# object"). Anything else from dump() is a real error.
_PICKLING_ERRORS = (TypeError, pickle.PicklingError, AttributeError)


class UnpicklableResult(Exception):
    """A value holds an object pickle cannot write (internal: the decorator turns it into a
    warning).

    Attributes:
        where: the path to that object inside the value, e.g. ``result['lock']``.
        kind: its type's qualified name.
        reason: pickle's own message.
    """

    def __init__(self, where: str, kind: str, reason: str) -> None:
        super().__init__(f"{where} is a {kind}, which cannot be pickled ({reason})")
        self.where, self.kind, self.reason = where, kind, reason


class _SkeletonPickler(pickle.Pickler):
    """The C pickler, leaving every plain numeric array out of the stream by number."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, protocol=5)
        self.arrays: list[np.ndarray[Any, Any]] = []
        self.numbers: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        kind = type(obj)
        if (kind is np.ndarray or kind is np.memmap) and not obj.dtype.hasobject:
            # Keyed by id(): self.arrays keeps each array alive, so no id is reused meanwhile
            # and an array reachable twice is stored once (and restored as one object).
            number = self.numbers.get(id(obj))
            if number is None:
                number = self.numbers[id(obj)] = len(self.arrays)
                self.arrays.append(obj)
            return number
        return None


_Order = Literal["C", "F"]


def _order(array: np.ndarray[Any, Any]) -> _Order:
    """joblib's choice: Fortran order only for arrays that are Fortran- but not C-contiguous."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def _wrapper_pickle(array: np.ndarray[Any, Any], order: _Order) -> bytes:
    """The pickle opcodes of joblib's NumpyArrayWrapper for ``array`` (no PROTO, no STOP)."""
    from joblib.numpy_pickle import NumpyArrayWrapper

    wrapper = NumpyArrayWrapper(np.ndarray, array.shape, order, array.dtype, allow_mmap=True)
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.fast = True  # no memo: the opcodes can be spliced into another stream
    pickler.dump(wrapper)
    raw = buffer.getvalue()
    assert raw[:2] == b"\x80\x02" and raw[-1:] == b"."
    return raw[2:-1]


def _array_chunks(array: np.ndarray[Any, Any], order: _Order) -> Iterator[memoryview]:
    """The bytes of ``array`` in ``order``: views of its own buffer where it is contiguous."""
    if array.size == 0:
        return
    contiguous = array.flags.c_contiguous if order == "C" else array.flags.f_contiguous
    if contiguous:
        flat = array.ravel(order=order).view(np.uint8).data  # a view, not a copy
        for start in range(0, flat.nbytes, _WRITE_CHUNK):
            yield flat[start : start + _WRITE_CHUNK]
        return
    # A strided view: copied a slab at a time, like joblib.
    for chunk in np.nditer(
        array,
        flags=["external_loop", "buffered", "zerosize_ok"],
        buffersize=max(_NDITER_BUFFER // array.itemsize, 1),
        order=order,
    ):
        yield np.ascontiguousarray(chunk).view(np.uint8).data


def _index(skeleton_len: int, arrays: list[np.ndarray[Any, Any]], offsets: list[int]) -> bytes:
    # Offsets are one fixed-width blob, so the index is as long before they are known as after.
    table = [(array.dtype, array.shape, _order(array)) for array in arrays]
    packed = struct.pack(f"<{len(offsets)}Q", *offsets)
    return _MAGIC + pickle.dumps((_VERSION, skeleton_len, table, packed), protocol=5)


def _compressed(compress: Any) -> bool:
    """Whether joblib would compress with this ``compress`` argument."""
    if isinstance(compress, tuple):
        return bool(compress[1] != 0)
    return isinstance(compress, str) or bool(compress)  # True, or a level from 1 to 9


def dump(value: Any, path: str | os.PathLike[str], *, compress: Any = False) -> tuple[int, str]:
    """Write ``value`` to ``path`` (readable by ``joblib.load``), flushed and fsynced.

    Returns:
        ``(size in bytes, hex xxh3-128 of the file)``, computed while writing (no second read).

    Raises:
        UnpicklableResult: ``value`` holds something pickle cannot write (the file is left
            partly written: the caller removes it).
    """
    with open(path, "wb") as handle:
        writer = HashingWriter(handle)
        try:
            if _compressed(compress):
                import joblib

                joblib.dump(value, writer, compress=compress)
            else:
                _dump_indexed(value, writer, os.path.dirname(os.fspath(path)))
        except _PICKLING_ERRORS as error:
            where, kind = _find_unpicklable(value)
            raise UnpicklableResult(where, kind, f"{type(error).__name__}: {error}") from error
        handle.flush()
        os.fsync(handle.fileno())
    return writer.size, writer.hasher.hexdigest()


class _Discard:
    def write(self, data: Any) -> int:
        return len(data)


def _pickles(value: Any) -> bool:
    try:
        _SkeletonPickler(_Discard()).dump(value)  # type: ignore[arg-type]  # arrays left out
    except (*_PICKLING_ERRORS, RecursionError):
        return False
    return True


def _parts(value: Any) -> list[tuple[str, Any]]:
    """The labelled parts of a container or an object (for :func:`_find_unpicklable`)."""
    if isinstance(value, dict):
        return [(f"[{key!r}]", item) for key, item in value.items()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return [(f".{name}", item) for name, item in zip(value._fields, value, strict=False)]
    if isinstance(value, (list, tuple)):
        return [(f"[{i}]", item) for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [(" (an item)", item) for item in value]
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):
        return [(f".{name}", item) for name, item in attributes.items()]
    return []


def _find_unpicklable(value: Any) -> tuple[str, str]:
    """Where, in ``value``, is the innermost part that does not pickle, and of what type.

    Run only after pickling failed: descends into the first part that fails on its own.
    """
    where = "result"
    for _ in range(50):  # deep enough for any real result; a cycle ends here too
        failing = next(((label, part) for label, part in _parts(value) if not _pickles(part)), None)
        if failing is None:
            break
        where, value = where + failing[0], failing[1]
    kind = type(value)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return where, name


def _dump_indexed(value: Any, writer: HashingWriter, folder: str) -> None:
    # The skeleton is pickled first (that is how the arrays are found), into memory, or into a
    # temporary file once large: a result made of Python objects is not held twice in memory.
    with tempfile.SpooledTemporaryFile(_SPOOL_MAX, dir=folder or None) as spool:
        skeleton_pickler = _SkeletonPickler(spool)  # type: ignore[arg-type]
        skeleton_pickler.dump(value)
        skeleton_len = spool.tell()
        spool.seek(0)
        _write_indexed(writer, spool, skeleton_len, skeleton_pickler.arrays)


def _write_indexed(
    writer: HashingWriter, skeleton: Any, skeleton_len: int, arrays: list[np.ndarray[Any, Any]]
) -> None:
    wrappers = [_wrapper_pickle(array, _order(array)) for array in arrays]

    # Lay the file out first: every offset follows from the lengths.
    offsets = [0] * (len(arrays) + 1)
    index_len = len(_index(skeleton_len, arrays, offsets))
    position = len(_HEAD) + _U64.size + index_len + 1 + len(_RESTORE)
    offsets[0] = position + 1 + _U64.size  # the skeleton's bytes
    position = offsets[0] + skeleton_len
    paddings: list[bytes] = []
    for number, (array, wrapper) in enumerate(zip(arrays, wrappers, strict=True)):
        position += len(wrapper)
        padding = _ALIGN - (position + 1) % _ALIGN  # joblib's rule: 1 to 16 bytes
        paddings.append(bytes([padding]) + b"\xff" * padding)
        position += 1 + padding
        offsets[number + 1] = position
        position += array.nbytes
    index = _index(skeleton_len, arrays, offsets)
    assert len(index) == index_len

    writer.write(_HEAD + _U64.pack(len(index)) + index + b"0" + _RESTORE)  # "0": POP
    writer.write(_BINBYTES8 + _U64.pack(skeleton_len))
    while chunk := skeleton.read(_WRITE_CHUNK):
        writer.write(chunk)
    assert writer.size == offsets[0] + skeleton_len
    for number, array in enumerate(arrays):
        writer.write(wrappers[number] + paddings[number])
        assert writer.size == offsets[number + 1]
        for chunk in _array_chunks(array, _order(array)):
            writer.write(chunk)
    writer.write(_TAIL)


def _restore(skeleton: bytes, *arrays: np.ndarray[Any, Any]) -> Any:
    """Rebuild a result from its skeleton and arrays (what ``joblib.load`` calls)."""
    return _SkeletonUnpickler(io.BytesIO(skeleton), arrays).load()


# -- reading --------------------------------------------------------------------------------


class _SkeletonUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, arrays: Any) -> None:
        super().__init__(file)
        self.arrays = arrays

    def persistent_load(self, pid: Any) -> Any:
        return self.arrays[pid]


def _pread(fd: int, count: int, offset: int) -> bytes:
    data = bytearray(count)
    read_exactly(fd, memoryview(data), offset)
    return bytes(data)


def _native(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The array in the machine's byte order, as ``joblib.load`` returns it without mmap."""
    dtype = array.dtype
    fields = dtype.fields.values() if dtype.fields else ()
    if dtype.byteorder == _FOREIGN or (
        dtype.byteorder == "|" and fields and all(f[0].byteorder == _FOREIGN for f in fields)
    ):
        swapped: np.ndarray[Any, Any] = array.byteswap().view(dtype.newbyteorder("="))
        return swapped
    return array


def load(
    path: str | os.PathLike[str],
    *,
    mmap_mode: str | None,
    reader: SharedReader | None = None,
    on_open: Callable[[int], None] | None = None,
    safe_types: Iterable[type] | None = None,
) -> Any:
    """Read a value written by :func:`dump` (``mmap_mode="r"`` memory-maps its arrays).

    Arrays are read through ``reader`` (default: a :class:`~cachedload.reading.SharedReader`
    that splits large ones between threads); ``on_open(fd)`` is called with the file opened.
    ``safe_types`` (a file someone else wrote): unpickle with the restricted unpickler,
    allowing these classes besides data (``()``: data only); ``None``: unrestricted.

    Raises:
        UnsafePickleError: with ``safe_types``, the file names something not allowed, or is
            compressed / written by joblib (not loadable without trusting its writer).
        OSError: the path is a symlink or not a regular file.
        ValueError, EOFError, pickle.UnpicklingError (and whatever joblib raises): the file is
        damaged.
    """
    fd, info = open_regular(path)
    try:
        if on_open is not None:
            on_open(fd)
        return load_open(
            fd, info.st_size, path=path, mmap_mode=mmap_mode, reader=reader, safe_types=safe_types
        )
    finally:
        os.close(fd)


def load_open(
    fd: int,
    size: int,
    *,
    path: str | os.PathLike[str] | None,
    mmap_mode: str | None,
    reader: SharedReader | None = None,
    safe_types: Iterable[type] | None = None,
) -> Any:
    """:func:`load` from an open file of ``size`` bytes: every byte used is read from ``fd``
    (memory maps are made from it too); ``path`` only names the maps' file (``filename``),
    None for a private copy. The caller keeps ``fd`` and closes it (maps stay valid).

    Raises:
        as :func:`load`.
    """
    head = os.pread(fd, _PROBE, 0)
    if not _indexed(head):
        if safe_types is not None:
            where = os.fspath(path) if path is not None else "<private copy>"
            raise UnsafePickleError(where, "only uncompressed entries load safely")
        if reader is not None:
            reader.before_unpickling(size)
        return _load_with_joblib(fd, path, mmap_mode)  # compressed, or written by joblib
    skeleton, table, offsets = _read_layout(fd, head, size, reader, safe_types)
    arrays = _read_arrays(fd, path, size, table, offsets, mmap_mode, reader)
    if reader is not None:
        reader.before_unpickling(0)  # a cancelled read-ahead stops here, before unpickling
    return _unpickle(skeleton, arrays, safe_types)


def load_buffer(
    buffer: np.ndarray[Any, Any], *, mmap_mode: str | None, safe_types: Iterable[type] | None = None
) -> Any:
    """:func:`load` from a file's bytes already in memory (read and verified by the caller).
    The arrays are views of ``buffer``: read-only with ``mmap_mode="r"``, as a map would be.

    Raises:
        as :func:`load`.
    """
    size = len(buffer)
    head = bytes(buffer[:_PROBE])
    if not _indexed(head):
        if safe_types is not None:
            raise UnsafePickleError("<verified copy>", "only uncompressed entries load safely")
        import joblib

        return joblib.load(io.BytesIO(buffer.data))
    start = len(_HEAD) + _U64.size
    index_len = _U64.unpack_from(head, len(_HEAD))[0]
    if start + index_len > size:
        raise ValueError("index runs past the end of the file")
    skeleton_len, table, offsets = _parse_index(
        bytes(buffer[start + len(_MAGIC) : start + index_len]), safe_types
    )
    check_layout(index_len, skeleton_len, table, offsets, size)
    skeleton = bytes(buffer[offsets[0] : offsets[0] + skeleton_len])
    whole = buffer.view(np.uint8).reshape(-1)
    if mmap_mode == "r":
        whole.flags.writeable = False
    arrays: list[np.ndarray[Any, Any]] = []
    for (dtype, shape, order), offset in zip(table, offsets[1:], strict=True):
        nbytes = _count(shape) * dtype.itemsize
        if offset + nbytes > size:
            raise ValueError("an array runs past the end of the file")
        array = whole[offset : offset + nbytes].view(dtype).reshape(shape, order=order)
        arrays.append(array if mmap_mode is not None else _native(array))
    return _unpickle(skeleton, arrays, safe_types)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _unpickle(
    skeleton: bytes, arrays: list[np.ndarray[Any, Any]], safe_types: Iterable[type] | None
) -> Any:
    if safe_types is not None:
        restricted = RestrictedUnpickler(io.BytesIO(skeleton), safe_types=safe_types, arrays=arrays)
        return restricted.load()
    return _SkeletonUnpickler(io.BytesIO(skeleton), arrays).load()


_Table = list[tuple[np.dtype[Any], tuple[int, ...], _Order]]  # each array's dtype, shape, order


def _read_layout(
    fd: int,
    head: bytes,
    size: int,
    reader: SharedReader | None,
    safe_types: Iterable[type] | None,
) -> tuple[bytes, _Table, tuple[int, ...]]:
    """Read a file's index and skeleton: ``(skeleton, table, offsets)``, where ``offsets``
    holds the skeleton's offset and then each array's. ``head`` is the file's first bytes."""
    start = len(_HEAD) + _U64.size
    index_len = _U64.unpack_from(head, len(_HEAD))[0]
    if start + index_len > size:
        raise ValueError("index runs past the end of the file")
    if reader is not None:
        reader.before_unpickling(index_len)
    index = head[start : start + index_len]
    if len(index) < index_len:
        index = _pread(fd, index_len, start)
    skeleton_len, table, offsets = _parse_index(index[len(_MAGIC) :], safe_types)
    check_layout(index_len, skeleton_len, table, offsets, size)  # arrays are not other bytes
    if reader is not None:
        reader.before_unpickling(skeleton_len)
    if offsets[0] + skeleton_len <= len(head):  # usually: one read for the head and all
        skeleton = head[offsets[0] : offsets[0] + skeleton_len]
    else:
        skeleton = _pread(fd, skeleton_len, offsets[0])
    return skeleton, table, offsets


def _parse_index(
    data: bytes, safe_types: Iterable[type] | None
) -> tuple[int, _Table, tuple[int, ...]]:
    """A data file's index: ``(skeleton length, table, offsets)``, checked. With
    ``safe_types`` (a cache others can write), unpickled by the restricted unpickler, and only
    plain array dtypes allowed (raw bytes become those arrays: no pointers).

    Raises:
        ValueError: it is not an index of this version (a damaged or crafted file).
        UnsafePickleError: with ``safe_types``, it holds what the restricted unpickler refuses.
    """
    found = pickle.loads(data) if safe_types is None else restricted_loads(data)
    if not (isinstance(found, tuple) and len(found) == 4):
        raise ValueError("the index is not a cachedload index")
    version, skeleton_len, table, packed = found
    if version != _VERSION:
        raise ValueError(f"unknown cachedload file version {version!r}")
    if not (_is_count(skeleton_len) and isinstance(table, list) and isinstance(packed, bytes)):
        raise ValueError("the index is not a cachedload index")
    for entry in table:
        if not (isinstance(entry, tuple) and len(entry) == 3):
            raise ValueError("the index's table is damaged")
        dtype, shape, order = entry
        if not (isinstance(dtype, np.dtype) and isinstance(shape, tuple)):
            raise ValueError("the index's table is damaged")
        if not (all(map(_is_count, shape)) and order in ("C", "F")):
            raise ValueError("the index's table is damaged")
        if safe_types is not None and dtype.hasobject:
            raise UnsafePickleError(repr(dtype), "not a plain array dtype")
    if len(packed) != 8 * (len(table) + 1):
        raise ValueError("the index's offsets are damaged")
    return skeleton_len, table, struct.unpack(f"<{len(table) + 1}Q", packed)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _read_arrays(
    fd: int,
    path: str | os.PathLike[str] | None,
    size: int,
    table: _Table,
    offsets: tuple[int, ...],
    mmap_mode: str | None,
    reader: SharedReader | None,
) -> list[np.ndarray[Any, Any]]:
    """The arrays a file's table lists, memory-mapped from ``fd`` (``mmap_mode``) or read."""
    arrays: list[np.ndarray[Any, Any]] = []
    for (dtype, shape, order), offset in zip(table, offsets[1:], strict=True):
        if offset + _count(shape) * dtype.itemsize > size:
            raise ValueError("an array runs past the end of the file")
        if mmap_mode is not None:
            arrays.append(_map(fd, path, dtype, shape, order, offset, mmap_mode))
            continue
        array = np.empty(shape, dtype, order=order)
        view = array.ravel(order=order).view(np.uint8).data
        if reader is None:
            read_parallel(fd, view, offset)
        else:
            reader.read(fd, view, offset)
        arrays.append(_native(array))
    return arrays


def _map(
    fd: int,
    path: str | os.PathLike[str] | None,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    order: _Order,
    offset: int,
    mmap_mode: str,
) -> np.memmap[Any, Any]:
    """Map one array of the open file ``fd`` (never reopened by name: the file mapped is the
    file checked); its ``filename`` is ``path``, as if mapped by name."""
    with open(fd, "rb", closefd=False) as handle:
        mode: Any = mmap_mode
        mapped: np.memmap[Any, Any] = np.memmap(
            handle, dtype=dtype, mode=mode, offset=offset, shape=shape, order=order
        )
    mapped.filename = None if path is None else os.path.abspath(path)
    return mapped


def _load_with_joblib(fd: int, path: str | os.PathLike[str] | None, mmap_mode: str | None) -> Any:
    """A file written by ``joblib.dump`` (compressed, or by older code): read from ``fd``.
    Memory-mapped only by name (joblib maps by name) when the caller gave one, which it does
    only for a file nobody else can write."""
    import joblib

    if mmap_mode is not None and path is not None:
        return joblib.load(path, mmap_mode=mmap_mode)
    with open(os.dup(fd), "rb") as handle:
        handle.seek(0)
        return joblib.load(handle)


def check_safe(value: Any, *, safe_types: Iterable[type] = ()) -> None:
    """Raise :class:`UnsafePickleError` if ``load(..., safe_types=safe_types)`` would refuse
    ``value`` once stored (for a warning at store time).

    Pickles ``value`` as :func:`dump` does, with its plain arrays left out (so the cost does not
    grow with their size), then loads that skeleton with the restricted unpickler.
    """
    buffer = io.BytesIO()
    pickler = _SkeletonPickler(buffer)
    pickler.dump(value)
    buffer.seek(0)
    RestrictedUnpickler(buffer, safe_types=safe_types, arrays=pickler.arrays).load()


# -- out-of-core files: arrays filled in place after the layout is written --------------------


class ArraySlot:
    """A placeholder for an array that is not in memory: :func:`dump_slotted` reserves its bytes.

    Put it in a value where the array will be (``ItemArray(array=ArraySlot(...), ...)``); the
    file's layout, every offset included, is computed from its shape and dtype alone, and the
    array's bytes are written later through the :class:`SlottedFile` (C order, native bytes).
    """

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise ValueError(f"an ArraySlot cannot hold Python objects (dtype {self.dtype})")

    @property
    def nbytes(self) -> int:
        count: int = self.dtype.itemsize
        for dim in self.shape:
            count *= dim
        return count

    def __repr__(self) -> str:
        return f"ArraySlot({self.shape!r}, {self.dtype.str!r})"


class _SlotPickler(_SkeletonPickler):
    """The skeleton pickler, leaving :class:`ArraySlot` placeholders out by number as well."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.items: list[np.ndarray[Any, Any] | ArraySlot] = []

    def persistent_id(self, obj: Any) -> int | None:
        kind = type(obj)
        if kind is str:  # most objects of a per-item result (its paths): 20,000 cost ~3 ms
            return None
        if kind is ArraySlot:
            number = self.numbers.get(id(obj))
            if number is None:
                number = self.numbers[id(obj)] = len(self.items)
                self.items.append(obj)
                self.arrays.append(obj)  # keeps it alive, like arrays
            return number
        number = super().persistent_id(obj)
        if number is not None and number == len(self.items):
            self.items.append(obj)
        return number


class ArrayExtent(NamedTuple):
    """Where one array's raw bytes sit in a data file."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    order: str

    @property
    def nbytes(self) -> int:
        count = self.dtype.itemsize
        for dim in self.shape:
            count *= dim
        return count


def array_extents(
    path: str | os.PathLike[str], safe_types: Iterable[type] | None = None
) -> list[ArrayExtent]:
    """Every array of an indexed data file (as :func:`dump` writes it), in pickling order,
    each checked to lie in the file's data area (:func:`check_layout`). ``safe_types``: as
    for :func:`load` (a file from a cache others can write: its index is read with the
    restricted unpickler).

    Raises:
        ValueError: the file is not an indexed cachedload file (compressed, joblib's own,
            damaged), or its index places an array outside its data area.
        UnsafePickleError: with ``safe_types``, its index holds what is not allowed.
    """
    fd, info = open_regular(path)
    try:
        size = info.st_size
        head = os.pread(fd, _PROBE, 0)
        if not _indexed(head):
            raise ValueError(f"{os.fspath(path)!r} is not an indexed cachedload data file")
        start = len(_HEAD) + _U64.size
        index_len = _U64.unpack_from(head, len(_HEAD))[0]
        if start + index_len > size:
            raise ValueError("index runs past the end of the file")
        index = head[start : start + index_len]
        if len(index) < index_len:
            index = _pread(fd, index_len, start)
    finally:
        os.close(fd)
    skeleton_len, table, offsets = _parse_index(index[len(_MAGIC) :], safe_types)
    check_layout(index_len, skeleton_len, table, offsets, size)
    return [
        ArrayExtent(offset, tuple(shape), dtype, order)
        for (dtype, shape, order), offset in zip(table, offsets[1:], strict=True)
    ]


def _indexed(head: bytes) -> bool:
    start = len(_HEAD) + _U64.size
    return head[: len(_HEAD)] == _HEAD and head[start : start + len(_MAGIC)] == _MAGIC


def check_layout(
    index_len: int, skeleton_len: int, table: _Table, offsets: tuple[int, ...], size: int
) -> None:
    """Check that a parsed index describes the file :func:`dump` writes: the skeleton right
    after the index, then each array after the previous one, the last before the file's end.
    An index whose offsets point elsewhere (at the header, the index, the skeleton, or one
    array into another) is damaged or crafted: its arrays would be other bytes of the file.

    Raises:
        ValueError: it does not.
    """
    skeleton_at = len(_HEAD) + _U64.size + index_len + 1 + len(_RESTORE) + 1 + _U64.size
    if offsets[0] != skeleton_at:
        raise ValueError("the index's skeleton offset is not where the skeleton starts")
    end = skeleton_at + skeleton_len
    for (dtype, shape, _), offset in zip(table, offsets[1:], strict=True):
        count = dtype.itemsize
        for dim in shape:
            count *= dim
        if offset < end:
            raise ValueError("the index places an array over the file's header or another array")
        end = offset + count
    if end > size - len(_TAIL):
        raise ValueError("an array runs past the end of the file's data")


def layout_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with an indexed data file's index (read with the restricted unpickler:
    never runs what it holds), or None; None for a file that is not indexed (compressed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        head = os.pread(fd, _PROBE, 0)
    finally:
        os.close(fd)
    if not _indexed(head):
        return None
    try:
        array_extents(path, safe_types=())
    except Exception as error:  # a damaged or crafted index raises many types
        return f"data file's index is damaged ({type(error).__name__}: {error})"
    return None


_COPY_FALLBACK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EXDEV", "ENOSYS", "EOPNOTSUPP", "EINVAL", "ENOTSUP", "EBADF")
    if hasattr(errno, name)
)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    """Copy ``count`` bytes between two files by offset, in the kernel where it can.

    ``os.copy_file_range`` (a reflink on XFS/btrfs, an in-kernel copy elsewhere); where it is
    missing or refused (another file system: ``EXDEV``, old kernels, some FUSE mounts),
    ``pread``/``pwrite`` in 8 MiB chunks.
    """
    copier = getattr(os, "copy_file_range", None)
    while count > 0 and copier is not None:
        try:
            done = copier(src_fd, dst_fd, count, src_offset, dst_offset)
        except OSError as exc:
            if exc.errno not in _COPY_FALLBACK_ERRNOS:
                raise
            break
        if done <= 0:
            break  # the source ended early, or nothing moved: let the plain loop decide
        count -= done
        src_offset += done
        dst_offset += done
    buffer = bytearray(min(count, _WRITE_CHUNK))
    view = memoryview(buffer)
    while count > 0:
        part = view[: min(count, len(buffer))]
        read_exactly(src_fd, part, src_offset)
        _pwrite_all(dst_fd, part, dst_offset)
        count -= len(part)
        src_offset += len(part)
        dst_offset += len(part)


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


class SlottedFile:
    """A data file being built: every byte but its slots' is written; fill them, then finish.

    Made by :func:`dump_slotted`. Writes are positioned (``pwrite``), in any order and from
    any thread (distinct ranges). The file's checksum is computed on the way when bytes arrive
    in file order (the usual case: rows written front to back), and by reading back only the
    ranges that were not (rows written out of order, copied with :func:`copy_range`, or
    written through :meth:`memmap`): in :meth:`finish`, while the file is flushed to disk.
    Every 16 MiB written, a flush starts in the background, so that little is left to write
    when the file is finished.

    Attributes:
        path: the file.
        slots: each slot's :class:`ArrayExtent`, in the order the slots were met while pickling.
        size: the file's final size.
    """

    def __init__(self, path: str, fd: int, slots: list[ArrayExtent], size: int) -> None:
        self.path = path
        self.fd = fd
        self.slots = slots
        self.size = size
        self._hasher = xxhash.xxh3_128()
        self._hashed = 0  # every byte before this one is in the hasher
        self._pending: list[tuple[int, int, bytes | None]] = []  # (start, end, data or unknown)
        self._lock = threading.Lock()
        self._mapped = False
        self._unsynced = 0  # bytes written since the last background flush started
        self._kept = 0  # bytes of the pending pieces kept in memory
        self._syncing: _Background | None = None

    def __enter__(self) -> SlottedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, slot: int, byte_offset: int, data: Any) -> None:
        """Write ``data`` (a buffer) at ``byte_offset`` bytes into slot number ``slot``."""
        view = memoryview(data).cast("B")
        start = self._place(slot, byte_offset, view.nbytes)
        _pwrite_all(self.fd, view, start)
        self._written(start, start + view.nbytes, view)

    def write_rows(self, slot: int, first_row: int, rows: np.ndarray[Any, Any]) -> None:
        """Write ``rows`` (converted to the slot's dtype, C order) from row ``first_row`` on."""
        extent = self.slots[slot]
        rows = np.ascontiguousarray(rows, dtype=extent.dtype)
        if rows.shape[1:] != extent.shape[1:]:
            raise ValueError(f"rows of shape {rows.shape[1:]} for a slot of {extent.shape[1:]}")
        row_bytes = extent.nbytes // extent.shape[0] if extent.shape[0] else 0
        self.write(slot, first_row * row_bytes, rows.reshape(-1).view(np.uint8))

    def copy_from(
        self, src_fd: int, src_offset: int, slot: int, byte_offset: int, count: int
    ) -> None:
        """Copy ``count`` bytes of another file into slot ``slot`` (see :func:`copy_range`)."""
        start = self._place(slot, byte_offset, count)
        copy_range(src_fd, src_offset, self.fd, start, count)
        self._written(start, start + count, None)

    def memmap(self, slot: int) -> np.memmap[Any, Any]:
        """A writable memory map of slot ``slot`` (its bytes are hashed by :meth:`finish`)."""
        extent = self.slots[slot]
        self._mapped = True
        mode: Any = "r+"
        return np.memmap(self.path, extent.dtype, mode, extent.offset, extent.shape, order="C")

    def finish(self) -> tuple[int, str]:
        """Hash what is left, fsync and close; return ``(size, hex xxh3-128 of the file)``."""
        if self._mapped:
            self._pending = []  # a map may have changed any byte after the hashed ones
        self._wait_sync()
        # The writeback runs while the bytes not hashed on the way (copied rows) are read
        # back: for a build that copied most rows, each takes about as long as the other.
        syncing = _Background(os.fsync, self.fd)
        try:
            self._catch_up(self.size)
        finally:
            syncing.join()
        self.close()
        return self.size, self._hasher.hexdigest()

    def close(self) -> None:
        """Close the file (without finishing it: for a build given up)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self._wait_sync()  # not while a flush still uses the descriptor
            os.close(self.fd)
            self.fd = -1

    # -- internals ---------------------------------------------------------------------------

    def _place(self, slot: int, byte_offset: int, count: int) -> int:
        extent = self.slots[slot]
        if byte_offset < 0 or byte_offset + count > extent.nbytes:
            raise ValueError(f"bytes {byte_offset}..{byte_offset + count} outside slot {slot}")
        return extent.offset + byte_offset

    def _written(self, start: int, end: int, data: memoryview | None) -> None:
        if start == end:
            return
        with self._lock:
            self._unsynced += end - start
            if self._unsynced >= _EARLY_SYNC_BYTES and (
                self._syncing is None or self._syncing.done
            ):
                self._wait_sync()
                self._unsynced = 0
                self._syncing = _Background(os.fdatasync, self.fd)
            if self._mapped:
                return  # finish() reads back everything after the hashed bytes
            if start == self._hashed and data is not None:
                self._hasher.update(data)
                self._hashed = end
                self._drain()
            else:
                # Small pieces are kept to hash later (a bounded total); large ones, and copied
                # ones, are read back by finish(), while the file is flushed.
                keep = None
                if data is not None and len(data) <= 65536 and self._kept < _KEPT_BYTES:
                    keep = bytes(data)
                    self._kept += len(keep)
                bisect.insort(self._pending, (start, end, keep))
                if len(self._pending) > 4096:  # far out of order: finish() reads it all back
                    self._mapped = True

    def _drain(self) -> None:
        """Hash the kept pieces that now follow the hashed bytes (up to one to read back)."""
        while self._pending and self._pending[0][0] == self._hashed:
            if self._pending[0][2] is None:
                return  # read back by finish()
            _start, end, data = self._pending.pop(0)
            self._hasher.update(data)  # type: ignore[arg-type]  # not None: checked above
            self._hashed = end

    def _catch_up(self, end: int) -> None:
        """Hash every byte up to ``end`` (reading from the file what is not pending in memory)."""
        self._pending = [piece for piece in self._pending if piece[2] is not None]
        while self._hashed < end:
            if self._pending and self._pending[0][0] == self._hashed:
                self._drain()
                continue
            stop = end if not self._pending else min(end, self._pending[0][0])
            self._hash_from_disk(self._hashed, stop)
            self._hashed = stop

    def _wait_sync(self) -> None:
        """Wait for the background flush, if one runs (and raise its error)."""
        if self._syncing is not None:
            syncing, self._syncing = self._syncing, None
            syncing.join()

    def _hash_from_disk(self, start: int, end: int) -> None:
        buffer = bytearray(min(end - start, _HASH_CHUNK))
        view = memoryview(buffer)
        while start < end:
            part = view[: min(end - start, len(buffer))]
            read_exactly(self.fd, part, start)
            self._hasher.update(part)
            start += len(part)


class _Background:
    """``function(*arguments)`` on a thread of its own; :meth:`join` waits and raises its
    error (an fsync's: the file is then not known to be on disk)."""

    def __init__(self, function: Callable[..., Any], *arguments: Any) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(function, arguments), name="cachedload-sync", daemon=True
        )
        self.thread.start()

    def _run(self, function: Callable[..., Any], arguments: tuple[Any, ...]) -> None:
        try:
            function(*arguments)
        except BaseException as error:
            self.error = error

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def dump_slotted(value: Any, path: str | os.PathLike[str]) -> SlottedFile:
    """Write ``value``, whose :class:`ArraySlot` placeholders are filled later, to ``path``.

    Everything but the slots' bytes is written now (the file is sized to its final length;
    the slots are holes until filled). Fill each slot through the returned
    :class:`SlottedFile`, then call its :meth:`~SlottedFile.finish`. The finished file is read
    by ``joblib.load`` and :func:`load` (``mmap_mode="r"`` maps each slot) like :func:`dump`'s,
    with each slot restored as a numpy array.

    Example:
        >>> value = {"x": ArraySlot((1000, 3), "float32"), "name": "demo"}  # doctest: +SKIP
        >>> with dump_slotted(value, "result.joblib") as out:  # doctest: +SKIP
        ...     out.write_rows(0, 0, rows)
        ...     size, checksum = out.finish()
    """
    path = os.fspath(path)
    buffer = io.BytesIO()
    pickler = _SlotPickler(buffer)
    pickler.dump(value)
    skeleton = buffer.getbuffer()
    items = pickler.items
    table = [
        (item.dtype, item.shape, "C" if isinstance(item, ArraySlot) else _order(item))
        for item in items
    ]
    wrappers = [
        _wrapper_pickle(item, order)  # type: ignore[arg-type]  # reads only .shape and .dtype
        for item, (_dtype, _shape, order) in zip(items, table, strict=True)
    ]

    def index_of(offsets: list[int]) -> bytes:
        packed = struct.pack(f"<{len(offsets)}Q", *offsets)
        return _MAGIC + pickle.dumps((_VERSION, len(skeleton), table, packed), protocol=5)

    # The same layout as _write_indexed: every offset follows from the lengths.
    offsets = [0] * (len(items) + 1)
    index_len = len(index_of(offsets))
    position = len(_HEAD) + _U64.size + index_len + 1 + len(_RESTORE)
    offsets[0] = position + 1 + _U64.size
    position = offsets[0] + len(skeleton)
    pieces: list[tuple[int, bytes]] = []  # (offset, bytes) of everything but the slots
    for number, (item, wrapper) in enumerate(zip(items, wrappers, strict=True)):
        padding = _ALIGN - (position + len(wrapper) + 1) % _ALIGN
        pieces.append((position, wrapper + bytes([padding]) + b"\xff" * padding))
        position += len(wrapper) + 1 + padding
        offsets[number + 1] = position
        position += item.nbytes
    tail_offset = position
    index = index_of(offsets)
    assert len(index) == index_len
    head = _HEAD + _U64.pack(len(index)) + index + b"0" + _RESTORE
    head += _BINBYTES8 + _U64.pack(len(skeleton)) + bytes(skeleton)
    assert len(head) == offsets[0] + len(skeleton)

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    slots: list[ArrayExtent] = []
    out = SlottedFile(path, fd, slots, tail_offset + len(_TAIL))
    try:
        os.ftruncate(fd, out.size)
        _pwrite_all(fd, head, 0)
        out._written(0, len(head), memoryview(head))
        for (start, piece), item, (dtype, shape, order), offset in zip(
            pieces, items, table, offsets[1:], strict=True
        ):
            _pwrite_all(fd, piece, start)
            out._written(start, start + len(piece), memoryview(piece))
            if isinstance(item, ArraySlot):
                slots.append(ArrayExtent(offset, shape, dtype, order))
            else:
                for chunk in _array_chunks(item, order):
                    _pwrite_all(fd, chunk, offset)
                    out._written(offset, offset + chunk.nbytes, chunk)
                    offset += chunk.nbytes
        _pwrite_all(fd, _TAIL, tail_offset)
        out._written(tail_offset, out.size, memoryview(_TAIL))
    except BaseException:
        out.close()
        raise
    return out
