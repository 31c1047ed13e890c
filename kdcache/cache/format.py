"""The cache's on-disk format: names, dtypes, codecs, version. Documented in docs/cache-format.md.

A cache is a Zarr v3 group::

    CACHE/                       root group; attributes = the cache's metadata (see ``REQUIRED_ATTRS``)
      blocks/000000/             one group per block of ``block_size`` consecutive examples
        input_ids      (I,)      token ids of every example's input, concatenated
        input_offsets  (n+1,)    int64; example j's input is input_ids[input_offsets[j]:input_offsets[j+1]]
        labels         (T,)      the distilled tokens, concatenated
        label_offsets  (n+1,)    int64; likewise for labels and every per-position array below
        target_ids     (T, k)    teacher's explicit entries (ids)
        target_logprobs(T, k)    float16 log-probabilities at temperature 1 (-inf = unused slot)
        tail_logprob   (T,)      float32 log of the mass the entries do not cover (-inf = none)
      blocks/000001/ ...

A block is a group of its own so that it is written whole by one process into storage no other
block touches; its ``complete`` attribute is set only after its arrays are written. The root's
``complete`` attribute is set by the finalize step, after every block is complete.
"""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

FORMAT = "kdcache.teacher-cache"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

BLOCKS = "blocks"
INPUT_IDS = "input_ids"
INPUT_OFFSETS = "input_offsets"
LABELS = "labels"
LABEL_OFFSETS = "label_offsets"
TARGET_IDS = "target_ids"
TARGET_LOGPROBS = "target_logprobs"
TAIL_LOGPROB = "tail_logprob"
BLOCK_ARRAYS = (INPUT_IDS, INPUT_OFFSETS, LABELS, LABEL_OFFSETS, TARGET_IDS, TARGET_LOGPROBS, TAIL_LOGPROB)

# Chunk lengths along the token axis. 4096 positions of top-64 uint16 ids is 512 KiB raw: large
# enough for contiguous reads and good compression, small enough to stream.
TOKEN_CHUNK = 4096
INPUT_CHUNK = 65536

# Attributes every complete cache carries; train-student and inspect rely on them.
REQUIRED_ATTRS = (
    "format", "format_version", "complete", "task", "k", "vocab_size", "index_dtype", "teacher",
    "tokenizer", "dataset", "block_size", "num_blocks", "num_examples",
)


def block_name(b: int) -> str:
    """Path of block ``b`` inside the root group (zero-padded so listings sort in order)."""
    return f"{BLOCKS}/{b:06d}"


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id of the vocabulary."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def compressors(name: str) -> list:
    """The codec chain of array ``name``, then a CRC32C checksum over each compressed chunk so corruption
    is detected on read. Chosen by measurement on the quickstart's top-64 and sampled caches
    (docs/results.md, "Storage"): token ids compress best with plain Zstandard at level 9 (89 B/position
    for 64 uint16 ids vs 94 at level 3); float values with Blosc's byte shuffle before Zstandard (the
    exponent bytes of sorted log-probs are alike: 69 vs 79 B/position for 64 float16s), at level 5
    because level 9 runs at 3 MB/s."""
    if name in (TARGET_LOGPROBS, TAIL_LOGPROB):
        return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    return [ZstdCodec(level=9 if name in (TARGET_IDS, INPUT_IDS, LABELS) else 3), Crc32cCodec()]
