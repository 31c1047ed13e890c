"""Caches on object storage: dump to, inspect, verify, resume on, and train from an ``s3://`` URL, against
a local S3-compatible server (moto) on 127.0.0.1. Credentials and endpoint come from the standard AWS
environment variables, as they would for a real bucket."""

import os
import socket

import numpy as np
import pytest
import zarr

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from conftest import run_cli

from kdcache import (
    DumpConfig,
    TrainConfig,
    dump_teacher,
    inspect_cache,
    open_cache,
    train_student,
    verify_cache,
)
from kdcache.errors import KdcacheError

BUCKET = "kdcache-test"


@pytest.fixture(scope="module")
def s3():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


def _kw(models_dir, dataset_file):
    return dict(model=models_dir["t5_teacher"], dataset=dataset_file, topk=6, limit=10, block_size=4, device="cpu")


def _same(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        for key, value in a[i].items():
            np.testing.assert_array_equal(value, b[i][key], err_msg=f"example {i} {key}")


def test_dump_inspect_verify_and_train_on_s3(s3, models_dir, dataset_file, tmp_path):
    url = f"{s3}/runs/cache"
    dump_teacher(DumpConfig(output=url, **_kw(models_dir, dataset_file)))
    dump_teacher(DumpConfig(output=str(tmp_path / "local"), **_kw(models_dir, dataset_file)))
    _same(open_cache(tmp_path / "local"), open_cache(url))
    info = inspect_cache(url)
    assert info["complete"] and info["examples"] == 10 and info["bytes"] > 0 and info["fidelity"]["kl"] > 0
    assert verify_cache(url) == []
    with pytest.raises(KdcacheError, match="already holds a complete cache"):
        dump_teacher(DumpConfig(output=url, **_kw(models_dir, dataset_file)))
    s = train_student(TrainConfig(cache=url, student=models_dir["t5_student"], output=str(tmp_path / "run"), max_steps=2,
                                  grad_accum=1, warmup_steps=0, device="cpu"))
    assert s["steps"] == 2 and (tmp_path / "run" / "final_model" / "model.safetensors").exists()


def test_resume_and_corruption_on_s3(s3, models_dir, dataset_file, capsys):
    import s3fs

    url = f"{s3}/resume/cache"
    dump_teacher(DumpConfig(output=url, **_kw(models_dir, dataset_file)))
    reference = [open_cache(url)[i] for i in range(10)]
    # a crash: block 1 never completed, the root never finalized
    g = zarr.open_group(url, mode="r+", use_consolidated=False)
    g.attrs["complete"] = False
    del g["blocks/000001"]
    assert inspect_cache(url)["state"] == "incomplete, 2/3 blocks"
    summary = dump_teacher(DumpConfig(output=url, **_kw(models_dir, dataset_file)))
    assert summary["blocks_written"] == 1
    cache = open_cache(url)
    for i in range(10):
        for key, value in reference[i].items():
            np.testing.assert_array_equal(value, cache[i][key])
    # a flipped byte in an object is found, named, and fails `kdcache verify`
    fs = s3fs.S3FileSystem()
    key = f"{BUCKET}/resume/cache/blocks/000002/target_logprobs/c/0/0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    code, out, err = run_cli(["verify", url], capsys)
    assert code == 1 and "blocks/000002/target_logprobs" in err
    code, out, err = run_cli(["inspect", "--json", url], capsys)
    assert code == 0 and '"complete": true' in out
