"""``kdcache inspect`` and ``kdcache verify``: what a cache holds, and whether every byte of it is sound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KdcacheError
from . import format as fmt
from . import storage
from .reader import TeacherCache, open_cache
from .writer import HIST_BINS, read_root_attrs, summarize_fidelity


def disk_bytes(path: str | Path) -> int:
    """Bytes of every file (or object) under ``path``."""
    return storage.size(path)


def _block_attrs(cache: TeacherCache) -> list[dict[str, Any] | None]:
    """Each block's attributes as written (None for a block never completed). Read from the block's own
    zarr.json, not consolidated metadata, which a partial cache does not have."""
    out = []
    for b in range(cache.num_blocks):
        attrs = read_root_attrs(storage.join(cache.path, fmt.block_name(b)))
        out.append(attrs if attrs and attrs.get("complete") else None)
    return out


def inspect_cache(path: str | Path) -> dict[str, Any]:
    """Summary of a cache, complete or not: provenance, counts, size, target statistics."""
    cache = open_cache(path, allow_incomplete=True)
    m = cache.meta
    blocks = [a for a in _block_attrs(cache) if a is not None]
    tokens = sum(a["tokens"] for a in blocks)
    examples = sum(a["examples"][1] - a["examples"][0] for a in blocks)
    hist = np.sum([a["captured_hist"] for a in blocks], axis=0) if blocks else np.zeros(HIST_BINS)
    p5 = int(np.searchsorted(np.cumsum(hist), 0.05 * max(tokens, 1))) / HIST_BINS
    size = disk_bytes(cache.path)
    complete = bool(m.get("complete"))
    return {
        "path": str(path),
        "format": m.get("format"),
        "format_version": m.get("format_version"),
        "complete": complete,
        "state": "complete" if complete else f"incomplete, {len(blocks)}/{cache.num_blocks} blocks",
        "blocks_complete": len(blocks),
        "blocks": cache.num_blocks,
        "task": m.get("task"),
        "targets": m.get("targets"),
        "k": m.get("k"),
        "teacher": m.get("teacher"),
        "tokenizer": m.get("tokenizer"),
        "dataset": m.get("dataset"),
        "examples": examples,
        "examples_planned": m.get("num_examples"),
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": size / tokens if tokens else None,
        "captured_mass_mean": sum(a["captured_sum"] for a in blocks) / tokens if tokens else None,
        "captured_mass_p5": p5 if tokens else None,
        "entropy_mean": sum(a["entropy_sum"] for a in blocks) / tokens if tokens else None,
        "entries_per_token": sum(a.get("entries_sum", 0) for a in blocks) / tokens if tokens else None,
        "fidelity": summarize_fidelity(blocks),
        "preprocessing": m.get("preprocessing"),
        "created": m.get("created"),
        "kdcache_version": m.get("kdcache_version"),
    }


def verify_cache(path: str | Path) -> list[str]:
    """Read every chunk of every array and check the structure; returns the problems found (empty
    when the cache is sound). Checks: format and attributes, every block complete, chunk checksums,
    array shapes and dtypes, offsets, ids within the vocabulary, each position's entries plus tail
    summing to 1, causal labels being the end of their sequence, and the totals in the attributes."""
    cache = open_cache(path, allow_incomplete=True)
    m = cache.meta
    problems: list[str] = []
    if not m.get("complete"):
        problems.append("the cache is incomplete (the dump did not finish)")
    k, vocab, dt = int(m["k"]), int(m["vocab_size"]), np.dtype(m["index_dtype"])
    total_examples = total_tokens = 0
    for b, attrs in enumerate(_block_attrs(cache)):
        name = fmt.block_name(b)
        if attrs is None:
            problems.append(f"{name} is not complete")
            continue
        arrays: dict[str, np.ndarray] = {}
        for arr_name in fmt.BLOCK_ARRAYS:
            try:
                arrays[arr_name] = cache.read_array(b, arr_name)
            except KdcacheError as exc:
                problems.append(str(exc))
        if len(arrays) < len(fmt.BLOCK_ARRAYS):
            continue
        start, stop = cache.block_range(b)
        n = stop - start
        in_off, lab_off = arrays[fmt.INPUT_OFFSETS], arrays[fmt.LABEL_OFFSETS]
        T = len(arrays[fmt.LABELS])
        checks = [
            (attrs["examples"] == [start, stop], f"covers examples {attrs['examples']}, expected [{start}, {stop})"),
            (len(in_off) == n + 1 and len(lab_off) == n + 1, f"has offsets for {len(lab_off) - 1} examples, expected {n}"),
            (in_off[0] == 0 and lab_off[0] == 0 and np.all(np.diff(in_off) >= 0) and np.all(np.diff(lab_off) > 0),
             "has offsets that do not start at 0 or do not increase"),
            (in_off[-1] == len(arrays[fmt.INPUT_IDS]) and lab_off[-1] == T, "has offsets that do not end at the arrays' lengths"),
            (arrays[fmt.TARGET_IDS].shape == (T, k) and arrays[fmt.TARGET_LOGPROBS].shape == (T, k)
             and arrays[fmt.TAIL_LOGPROB].shape == (T,), f"has target arrays whose shapes do not match {T} positions × k={k}"),
            (all(arrays[x].dtype == dt for x in (fmt.INPUT_IDS, fmt.LABELS, fmt.TARGET_IDS)), f"has id arrays that are not {dt}"),
            (attrs["tokens"] == T, f"records {attrs['tokens']} tokens but holds {T}"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            problems.extend(f"{name} {msg}" for msg in bad)
            continue
        ids = arrays[fmt.TARGET_IDS]
        lp = arrays[fmt.TARGET_LOGPROBS].astype(np.float64)
        used = np.isfinite(lp)
        if np.any(ids[used] >= vocab) or np.any(arrays[fmt.LABELS] >= vocab):
            problems.append(f"{name} holds token ids outside the vocabulary ({vocab})")
        if np.any(np.isnan(lp)) or np.any(lp > 1e-3):
            problems.append(f"{name}/{fmt.TARGET_LOGPROBS} holds NaN or positive log-probabilities")
        mass = np.where(used, np.exp(lp), 0.0).sum(-1) + np.exp(arrays[fmt.TAIL_LOGPROB].astype(np.float64))
        if T and np.max(np.abs(mass - 1.0)) > 0.02:  # float16 entries: ~1e-3 relative error each
            problems.append(f"{name}: entries plus tail sum to {mass.min():.3f}..{mass.max():.3f}, not 1")
        if m.get("task") == "causal":
            for j in range(n):
                seq = arrays[fmt.INPUT_IDS][in_off[j] : in_off[j + 1]]
                lab = arrays[fmt.LABELS][lab_off[j] : lab_off[j + 1]]
                if len(lab) >= len(seq) or not np.array_equal(seq[len(seq) - len(lab) :], lab):
                    problems.append(f"{name}: example {start + j}'s labels are not the end of its sequence")
                    break
        total_examples += n
        total_tokens += T
    if m.get("complete"):
        if total_examples != m["num_examples"]:
            problems.append(f"blocks hold {total_examples} examples, attributes say {m['num_examples']}")
        if "tokens" in m and total_tokens != m["tokens"]:
            problems.append(f"blocks hold {total_tokens} tokens, attributes say {m['tokens']}")
    return problems
