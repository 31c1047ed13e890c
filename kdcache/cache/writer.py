"""Writing a cache: create or resume, one block at a time, then finalize.

The writer never touches data it was not asked to replace: an existing cache made with other
parameters, or a complete one, is refused unless ``overwrite`` is set; a partial cache made with the
same parameters is resumed (complete blocks are kept, any other block is rewritten from scratch).
"""

from __future__ import annotations

import datetime as _dt
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import KdcacheError
from . import format as fmt
from . import storage

# Captured-mass histogram kept per block, so the finalize step can report percentiles without
# re-reading every target.
HIST_BINS = 200


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_root_attrs(path: str | Path) -> dict[str, Any] | None:
    """The attributes of the Zarr group at ``path`` (local or URL), or None when there is no group there."""
    meta = storage.read_json(storage.join(path, "zarr.json"))
    return None if meta is None else meta.get("attributes", {})


def summarize_fidelity(blocks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cache's ``fidelity`` object from its blocks' sums: means over the probed positions of the
    captured mass, total variation and KL(teacher ‖ target). ``kl`` is None (JSON null) when the KL is
    infinite somewhere — always so for sampled targets — and ``kl_infinite_fraction`` says where."""
    sums = [a["fidelity"] for a in blocks if a.get("fidelity")]
    n = sum(f["positions"] for f in sums)
    if not n:
        return None
    inf = sum(f["kl_infinite"] for f in sums)
    return {
        "positions": n,
        "captured_mass": sum(f["captured_sum"] for f in sums) / n,
        "tvd": sum(f["tvd_sum"] for f in sums) / n,
        "kl": None if inf else sum(f["kl_sum"] for f in sums) / n,
        "kl_infinite_fraction": inf / n,
        "kl_finite_mean": sum(f["kl_sum"] for f in sums) / (n - inf) if n > inf else None,
    }


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: cache has {old.get(key)!r}, this run has {new.get(key)!r}"
    return None


class CacheWriter:
    """Creates (or resumes) the cache at ``path`` and writes its blocks.

    meta: the root attributes; ``meta["params"]`` holds every setting that changes the cache's
    content and must match for a resume.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], *, overwrite: bool = False) -> None:
        self.path = storage.location(path)
        self.meta = dict(meta)
        old = read_root_attrs(self.path)
        if old is None and storage.nonempty_dir(self.path) and not overwrite:
            raise KdcacheError(f"{self.path} exists and is not a kdcache cache; choose another --output or pass --overwrite")
        if old is not None and not overwrite:
            if old.get("format") != fmt.FORMAT:
                raise KdcacheError(f"{self.path} holds a Zarr group that is not a kdcache cache; pass --overwrite to replace it")
            if old.get("complete"):
                raise KdcacheError(f"{self.path} already holds a complete cache; pass --overwrite to replace it")
            diff = _first_difference(old.get("params", {}), self.meta.get("params", {}))
            if diff:
                raise KdcacheError(
                    f"{self.path} holds a partial cache made with other parameters ({diff}); "
                    "rerun with the same parameters to resume, or pass --overwrite"
                )
            self.meta["created"] = old.get("created", _now())
            self.resumed = True
        else:
            storage.remove(self.path)
            self.meta["created"] = _now()
            self.meta["complete"] = False
            root = zarr.open_group(self.path, mode="w", attributes=self.meta)
            root.create_group(fmt.BLOCKS)  # explicit: Zarr v3 has no implicit parent groups
            self.resumed = False
        self.root = zarr.open_group(self.path, mode="r+")

    def block_complete(self, b: int) -> bool:
        """True when block ``b`` was written whole (its ``complete`` attribute is set last)."""
        attrs = read_root_attrs(storage.join(self.path, fmt.block_name(b)))
        return bool(attrs and attrs.get("complete"))

    def write_block(
        self,
        b: int,
        start: int,
        input_ids: list[np.ndarray],
        labels: list[np.ndarray],
        target_ids: np.ndarray,
        target_logprobs: np.ndarray,
        tail_logprob: np.ndarray,
        entropy: np.ndarray,
        captured: np.ndarray | None = None,
        fidelity: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write block ``b`` (examples ``start`` .. ``start + len(labels)``) whole, then mark it complete.

        input_ids, labels: one 1-D array per example; target_ids (T, k); target_logprobs (T, k);
        tail_logprob (T,); entropy (T,) with T = total labels; captured (T,) the teacher mass held
        exactly (default: the entries' mass; sampled targets pass their exact head's); fidelity:
        {captured_mass, tvd, kl} (F,) measured on a sample of positions (kdcache.sparse.fidelity),
        kept as sums. Any earlier partial write of the block is discarded first, so a rewrite gives
        the same arrays as a first write.
        """
        dt = np.dtype(self.meta["index_dtype"])
        k = int(self.meta["k"])
        n_tok = int(sum(len(x) for x in labels))
        if target_ids.shape != (n_tok, k) or target_logprobs.shape != (n_tok, k) or tail_logprob.shape != (n_tok,):
            raise ValueError("targets do not match the labels' total length")
        g = zarr.open_group(storage.join(self.path, fmt.block_name(b)), mode="w")
        def put(name: str, data: np.ndarray, chunk: int) -> None:
            chunks = (max(1, min(chunk, len(data))),) + data.shape[1:]
            g.create_array(name, data=data, chunks=chunks, compressors=fmt.compressors(name))

        put(fmt.INPUT_IDS, np.concatenate(input_ids).astype(dt) if input_ids else np.zeros(0, dt), fmt.INPUT_CHUNK)
        put(fmt.INPUT_OFFSETS, np.concatenate([[0], np.cumsum([len(x) for x in input_ids])]).astype(np.int64), fmt.INPUT_CHUNK)
        put(fmt.LABELS, np.concatenate(labels).astype(dt) if labels else np.zeros(0, dt), fmt.TOKEN_CHUNK)
        put(fmt.LABEL_OFFSETS, np.concatenate([[0], np.cumsum([len(x) for x in labels])]).astype(np.int64), fmt.INPUT_CHUNK)
        put(fmt.TARGET_IDS, target_ids.astype(dt), fmt.TOKEN_CHUNK)
        put(fmt.TARGET_LOGPROBS, target_logprobs.astype(np.float16), fmt.TOKEN_CHUNK)
        put(fmt.TAIL_LOGPROB, tail_logprob.astype(np.float32), fmt.TOKEN_CHUNK)
        if captured is None:
            captured = np.exp(target_logprobs.astype(np.float64)).sum(-1)
        captured = captured.astype(np.float64)
        hist = np.histogram(np.clip(captured, 0, 1), bins=HIST_BINS, range=(0.0, 1.0))[0]
        extra: dict[str, Any] = {}
        if fidelity is not None:
            kl = fidelity["kl"].astype(np.float64)
            extra["fidelity"] = {
                "positions": len(kl),
                "captured_sum": float(fidelity["captured_mass"].astype(np.float64).sum()),
                "tvd_sum": float(fidelity["tvd"].astype(np.float64).sum()),
                "kl_sum": float(kl[np.isfinite(kl)].sum()),
                "kl_infinite": int((~np.isfinite(kl)).sum()),
            }
        storage.flush(storage.join(self.path, fmt.block_name(b)))
        # Written last: a block whose attributes say complete has all its arrays on storage.
        g.attrs.update(
            {
                "examples": [start, start + len(labels)],
                "tokens": n_tok,
                "input_tokens": int(sum(len(x) for x in input_ids)),
                "captured_sum": float(captured.sum()),
                "entropy_sum": float(entropy.astype(np.float64).sum()),
                "captured_hist": hist.tolist(),
                # Explicit entries actually used (sampled targets leave slots empty): the storage report's "per token".
                "entries_sum": int(np.isfinite(target_logprobs).sum()),
                **extra,
                "complete": True,
            }
        )

    def finalize(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Aggregate the blocks' statistics into the root attributes and mark the cache complete."""
        n_blocks = int(self.meta["num_blocks"])
        tokens = input_tokens = 0
        captured_sum = entropy_sum = 0.0
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        blocks = []
        for b in range(n_blocks):
            attrs = read_root_attrs(storage.join(self.path, fmt.block_name(b)))
            if not attrs or not attrs.get("complete"):
                raise KdcacheError(f"cannot finalize {self.path}: block {b} is not complete")
            blocks.append(attrs)
            tokens += attrs["tokens"]
            input_tokens += attrs["input_tokens"]
            captured_sum += attrs["captured_sum"]
            entropy_sum += attrs["entropy_sum"]
            hist += np.asarray(attrs["captured_hist"], dtype=np.int64)
        cdf = np.cumsum(hist)
        p5_bin = int(np.searchsorted(cdf, 0.05 * max(tokens, 1)))
        stats = {
            "tokens": tokens,
            "input_tokens": input_tokens,
            "captured_mass_mean": captured_sum / max(tokens, 1),
            # Lower edge of the histogram bin holding the 5th percentile (bins are 0.005 wide).
            "captured_mass_p5": p5_bin / HIST_BINS,
            "entropy_mean": entropy_sum / max(tokens, 1),
            "fidelity": summarize_fidelity(blocks),
            "finished": _now(),
        }
        self.root.attrs.update({**(extra or {}), **stats, "complete": True})
        with warnings.catch_warnings():
            # Consolidated metadata is not in the v3 spec yet; zarr-python reads it and so does kdcache.
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.path)
        return dict(self.root.attrs)
