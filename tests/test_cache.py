"""The cache store: round trip, layout readable with plain zarr, refusals, resume bookkeeping."""

import json

import numpy as np
import pytest
import zarr

from kdcache.cache import CacheWriter, open_cache
from kdcache.cache import format as fmt
from kdcache.errors import KdcacheError


def _meta(n, block_size, k=4, vocab=300, **params):
    return {
        "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "task": "seq2seq", "targets": "topk", "k": k,
        "vocab_size": vocab, "index_dtype": fmt.index_dtype(vocab).name,
        "teacher": {"name": "t"}, "tokenizer": {"fingerprint": "sha256:x", "name": "t", "vocab_size": vocab},
        "dataset": {"name": "d"}, "block_size": block_size, "num_blocks": -(-n // block_size), "num_examples": n,
        "params": {"k": k, **params},
    }


def _examples(n, k=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        n_in, n_lab = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        lp = np.log(rng.dirichlet(np.ones(k + 1), size=n_lab))
        out.append({
            "input_ids": rng.integers(0, 300, n_in), "labels": rng.integers(0, 300, n_lab),
            "target_ids": rng.integers(0, 300, (n_lab, k)), "target_logprobs": lp[:, :k], "tail_logprob": lp[:, k],
        })
    return out


def _write(path, exs, block_size, blocks=None, finalize=True, **params):
    w = CacheWriter(path, _meta(len(exs), block_size, **params))
    for b in blocks if blocks is not None else range(-(-len(exs) // block_size)):
        part = exs[b * block_size : (b + 1) * block_size]
        w.write_block(
            b, b * block_size, [e["input_ids"] for e in part], [e["labels"] for e in part],
            np.concatenate([e["target_ids"] for e in part]), np.concatenate([e["target_logprobs"] for e in part]),
            np.concatenate([e["tail_logprob"] for e in part]), np.zeros(sum(len(e["labels"]) for e in part)),
        )
    if finalize:
        w.finalize()
    return w


def test_round_trip_and_dtypes(tmp_path):
    exs = _examples(11)
    _write(tmp_path / "c", exs, block_size=4)
    cache = open_cache(tmp_path / "c")
    assert len(cache) == 11 and cache.num_blocks == 3
    for i, e in enumerate(exs):
        got = cache[i]
        np.testing.assert_array_equal(got["input_ids"], e["input_ids"])
        np.testing.assert_array_equal(got["labels"], e["labels"])
        np.testing.assert_array_equal(got["target_ids"], e["target_ids"])
        np.testing.assert_allclose(got["target_logprobs"], e["target_logprobs"], rtol=1e-3)
        np.testing.assert_allclose(got["tail_logprob"], e["tail_logprob"], rtol=1e-6)
        assert got["target_ids"].dtype == np.uint16 and got["target_logprobs"].dtype == np.float16
    # whole-block reads give the same examples
    streamed = [blk.example(j) for blk in cache.iter_blocks() for j in range(len(blk))]
    for a, b in zip(streamed, (cache[i] for i in range(11))):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert cache.meta["tokens"] == sum(len(e["labels"]) for e in exs)
    with pytest.raises(IndexError):
        cache[11]


def test_plain_zarr_reads_the_layout(tmp_path):
    exs = _examples(5)
    _write(tmp_path / "c", exs, block_size=8)
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    assert g.attrs["format"] == fmt.FORMAT and g.attrs["k"] == 4 and g.attrs["complete"] is True
    blk = g["blocks/000000"]
    off = blk["label_offsets"][:]
    np.testing.assert_array_equal(blk["labels"][off[2] : off[3]], exs[2]["labels"])
    codecs = [type(c).__name__ for c in blk["target_ids"].compressors]
    assert "Crc32cCodec" in codecs


def test_index_dtype():
    assert fmt.index_dtype(256) == np.uint8
    assert fmt.index_dtype(32128) == np.uint16
    assert fmt.index_dtype(65536) == np.uint16
    assert fmt.index_dtype(65537) == np.uint32
    assert fmt.index_dtype(151936) == np.uint32


def test_refuses_to_overwrite_a_complete_cache(tmp_path):
    _write(tmp_path / "c", _examples(3), block_size=2)
    before = (tmp_path / "c" / "zarr.json").read_text()
    with pytest.raises(KdcacheError, match="already holds a complete cache"):
        CacheWriter(tmp_path / "c", _meta(3, 2))
    assert (tmp_path / "c" / "zarr.json").read_text() == before
    CacheWriter(tmp_path / "c", _meta(3, 2), overwrite=True)  # explicit: allowed
    assert not json.loads((tmp_path / "c" / "zarr.json").read_text())["attributes"]["complete"]


def test_partial_cache_resumes_and_refuses_other_parameters(tmp_path):
    exs = _examples(7)
    _write(tmp_path / "c", exs, block_size=3, blocks=[0, 2], finalize=False)
    with pytest.raises(KdcacheError, match="incomplete"):
        open_cache(tmp_path / "c")
    with pytest.raises(KdcacheError, match="k: cache has 4, this run has 8"):
        CacheWriter(tmp_path / "c", _meta(7, 3, k=8))
    w = CacheWriter(tmp_path / "c", _meta(7, 3))
    assert w.resumed and [w.block_complete(b) for b in range(3)] == [True, False, True]


def test_open_cache_refusals(tmp_path):
    with pytest.raises(KdcacheError, match="does not exist"):
        open_cache(tmp_path / "missing")
    zarr.open_group(str(tmp_path / "other"), mode="w", attributes={"format": "something"})
    with pytest.raises(KdcacheError, match="not a kdcache cache"):
        open_cache(tmp_path / "other")
    _write(tmp_path / "c", _examples(2), block_size=2)
    g = zarr.open_group(str(tmp_path / "c"), mode="r+", use_consolidated=False)
    g.attrs["format_version"] = 99
    zarr.consolidate_metadata(str(tmp_path / "c"))
    with pytest.raises(KdcacheError, match="format version 99"):
        open_cache(tmp_path / "c")
