"""Which compressor for which array? Re-encode one block of a real cache with candidate codecs.

    python pipelines/codec_study.py CACHE [--block 0]

Prints, for the per-position arrays (target ids, log-probs, tail), the compressed bytes per distilled
position and the encode speed of each candidate; kdcache.cache.format.compressors() is the choice this
measurement made (docs/results.md, "Storage"). Also shows what rounding log-probs to fewer mantissa bits
(``dump-teacher --logprob-bits``) saves.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numcodecs import Blosc, Zstd

from kdcache import open_cache
from kdcache.cache import format as fmt

CANDIDATES = {
    "zstd-3": Zstd(level=3),
    "zstd-9": Zstd(level=9),
    "blosc-zstd-5-shuffle": Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
    "blosc-zstd-5-bitshuffle": Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE),
    "blosc-zstd-9-shuffle": Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE),
}


def measure(a: np.ndarray, positions: int) -> dict[str, tuple[float, float]]:
    """codec → (bytes per position, encode MB/s), encoding in TOKEN_CHUNK-row chunks as the cache does."""
    out = {}
    for name, codec in CANDIDATES.items():
        t = time.perf_counter()
        size = sum(len(codec.encode(np.ascontiguousarray(a[i : i + fmt.TOKEN_CHUNK]))) for i in range(0, len(a), fmt.TOKEN_CHUNK))
        out[name] = (size / positions, a.nbytes / 1e6 / (time.perf_counter() - t))
    return out


def round_bits(lp: np.ndarray, bits: int) -> np.ndarray:
    import torch

    from kdcache.sparse import round_mantissa

    return round_mantissa(torch.from_numpy(lp.astype(np.float32)), bits).numpy().astype(np.float16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--block", type=int, default=0)
    args = ap.parse_args()
    cache = open_cache(args.cache)
    arrays = {name: cache.read_array(args.block, name) for name in (fmt.TARGET_IDS, fmt.TARGET_LOGPROBS, fmt.TAIL_LOGPROB)}
    n = len(arrays[fmt.TAIL_LOGPROB])
    arrays["target_logprobs, 7 mantissa bits"] = round_bits(arrays[fmt.TARGET_LOGPROBS], 7)
    print(f"{args.cache} block {args.block}: {n:,} positions, k={cache.meta['k']}, targets={cache.meta.get('targets')}, "
          f"stored logprob_bits={cache.meta.get('logprob_bits', 10)}")
    print(f"{'array':<34} {'raw':>6}  " + "  ".join(f"{c:>24}" for c in CANDIDATES))
    for name, a in arrays.items():
        res = measure(a, n)
        print(f"{name:<34} {a.nbytes / n:>6.1f}  " + "  ".join(f"{b:>9.1f} B @ {s:>6.0f} MB/s" for b, s in res.values()))


if __name__ == "__main__":
    main()
