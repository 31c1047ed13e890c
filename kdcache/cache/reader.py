"""Reading a cache: random access by example, and whole-block reads for streaming."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import KdcacheError
from . import format as fmt
from . import storage

# Keys of an example dict → the block array each is sliced from.
_EXAMPLE_KEYS = {
    "input_ids": fmt.INPUT_IDS,
    "labels": fmt.LABELS,
    "target_ids": fmt.TARGET_IDS,
    "target_logprobs": fmt.TARGET_LOGPROBS,
    "tail_logprob": fmt.TAIL_LOGPROB,
}


@dataclass
class Block:
    """One block's arrays, in memory. Example j of the block is ``block.example(j)``."""

    start: int
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays[fmt.LABEL_OFFSETS]) - 1

    def example(self, j: int) -> dict[str, np.ndarray]:
        """Example j as a dict of arrays (see :meth:`TeacherCache.__getitem__`)."""
        a = self.arrays
        i0, i1 = a[fmt.INPUT_OFFSETS][j : j + 2]
        t0, t1 = a[fmt.LABEL_OFFSETS][j : j + 2]
        return {key: a[name][i0:i1] if name == fmt.INPUT_IDS else a[name][t0:t1] for key, name in _EXAMPLE_KEYS.items()}


class TeacherCache:
    """A read-only teacher cache. ``len(cache)`` examples; ``cache[i]`` → dict of numpy arrays:

    - ``input_ids`` (n_in,): the tokenized input (causal: the whole sequence);
    - ``labels`` (n,): the distilled tokens (causal: the last n tokens of ``input_ids``);
    - ``target_ids`` (n, k), ``target_logprobs`` (n, k) float16, ``tail_logprob`` (n,) float32:
      position j is the teacher's distribution for ``labels[j]``.
    """

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = storage.location(path)
        self.group = group
        self.meta: dict[str, Any] = dict(group.attrs)
        self._offsets: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def __repr__(self) -> str:
        return f"TeacherCache({self.path!r}, examples={len(self)}, k={self.meta.get('k')}, task={self.meta.get('task')!r})"

    @property
    def num_blocks(self) -> int:
        return int(self.meta["num_blocks"])

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    def block_range(self, b: int) -> tuple[int, int]:
        """Examples [start, stop) of block b."""
        start = b * self.block_size
        return start, min(start + self.block_size, len(self))

    def block_complete(self, b: int) -> bool:
        try:
            return bool(self.group[fmt.block_name(b)].attrs.get("complete"))
        except KeyError:
            return False

    def _array(self, b: int, name: str) -> zarr.Array:
        return self.group[f"{fmt.block_name(b)}/{name}"]

    def read_array(self, b: int, name: str, selection: Any = Ellipsis) -> np.ndarray:
        """``blocks/b/name[selection]``. A chunk that fails its checksum or does not decode raises a
        KdcacheError naming the array and the chunk, so a flipped byte never becomes a silent wrong number."""
        arr = self._array(b, name)
        try:
            return arr[selection]
        except Exception as exc:  # zarr surfaces codec failures as ValueError and friends
            bad = self._find_bad_chunk(arr)
            where = f"chunk {bad}" if bad else "a chunk"
            raise KdcacheError(
                f"corrupted cache: {self.path}/{fmt.block_name(b)}/{name} {where} cannot be read "
                f"({type(exc).__name__}: {exc}); re-dump this cache (or restore it from a copy)"
            ) from exc

    @staticmethod
    def _find_bad_chunk(arr: zarr.Array) -> str | None:
        """Key of the first chunk of ``arr`` that fails to decode (arrays are chunked along axis 0 only)."""
        step = arr.chunks[0]
        for c in range(-(-arr.shape[0] // step) if arr.shape[0] else 0):
            try:
                arr[c * step : (c + 1) * step]
            except Exception:
                return "c/" + "/".join([str(c)] + ["0"] * (arr.ndim - 1))
        return None

    def read_block(self, b: int) -> Block:
        """All arrays of block b, read whole (contiguous chunk reads)."""
        arrays = {name: self.read_array(b, name) for name in fmt.BLOCK_ARRAYS}
        return Block(start=self.block_range(b)[0], arrays=arrays)

    def iter_blocks(self, order: list[int] | None = None) -> Iterator[Block]:
        for b in order if order is not None else range(self.num_blocks):
            yield self.read_block(b)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} out of range for a cache of {n} examples")
        b, j = divmod(i, self.block_size)
        if b not in self._offsets:
            self._offsets[b] = (self.read_array(b, fmt.INPUT_OFFSETS), self.read_array(b, fmt.LABEL_OFFSETS))
        in_off, lab_off = self._offsets[b]
        inputs = slice(int(in_off[j]), int(in_off[j + 1]))
        positions = slice(int(lab_off[j]), int(lab_off[j + 1]))
        return {
            key: self.read_array(b, name, inputs if name == fmt.INPUT_IDS else positions)
            for key, name in _EXAMPLE_KEYS.items()
        }


def open_cache(path: str | Path, *, allow_incomplete: bool = False) -> TeacherCache:
    """Open the cache at ``path`` read-only; refuse anything that is not a complete kdcache cache.

    Raises KdcacheError (one line: what is wrong, what to do) for a missing path, a foreign Zarr
    group, an unsupported format version, or an incomplete cache (unless ``allow_incomplete``).
    """
    p = storage.location(path)
    if not storage.exists(p):
        raise KdcacheError(f"no cache at {path}: the path does not exist (run `kdcache dump-teacher --output {path}` first)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated metadata is not in the v3 spec yet
            group = zarr.open_group(p, mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise KdcacheError(f"{path} is not a Zarr group ({type(exc).__name__}: {exc})") from exc
    attrs = dict(group.attrs)
    if attrs.get("format") != fmt.FORMAT:
        raise KdcacheError(f"{path} is not a kdcache cache (format attribute is {attrs.get('format')!r})")
    version = attrs.get("format_version")
    if version not in fmt.SUPPORTED_VERSIONS:
        raise KdcacheError(
            f"{path} has cache format version {version}; this kdcache reads version(s) "
            f"{', '.join(map(str, fmt.SUPPORTED_VERSIONS))} (upgrade kdcache or re-dump the teacher)"
        )
    if not attrs.get("complete") and not allow_incomplete:
        raise KdcacheError(f"{path} is an incomplete cache (the dump did not finish); rerun the same dump-teacher command to resume it")
    missing = [a for a in fmt.REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise KdcacheError(f"{path} lacks cache attributes {', '.join(missing)}")
    return TeacherCache(p, group)
