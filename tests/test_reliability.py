"""A cache you can trust: SIGKILL and resume, corruption detected and named, inspect/verify, refusals
that touch nothing."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as _cli

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

EXE = Path(sys.executable).parent / "kdcache"


def _same_arrays(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"example {i} {key}")


@pytest.fixture(scope="module")
def big_dataset(dataset_file, tmp_path_factory):
    """200 rows (the 40 functions, five times over) so a dump lasts long enough to be killed mid-way."""
    rows = [json.loads(line) for line in open(dataset_file)]
    path = tmp_path_factory.mktemp("big") / "rows.jsonl"
    with path.open("w") as f:
        for rep in range(5):
            for r in rows:
                f.write(json.dumps({**r, "article": f"# copy {rep}\n" + r["article"]}) + "\n")
    return str(path)


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_arrays(models_dir, big_dataset, tmp_path):
    args = ["dump-teacher", "--model", models_dir["t5_teacher"], "--dataset", big_dataset, "--topk", "8",
            "--block-size", "4", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    subprocess.run([str(EXE), *args, "--output", str(tmp_path / "ref")], check=True, capture_output=True, env=env)
    duration = time.perf_counter() - t0  # kill moments scale with this machine's speed
    rng = random.Random(0)
    kills = 0
    killed = tmp_path / "killed"

    def complete() -> bool:
        return (killed / "zarr.json").exists() and inspect_cache(killed)["complete"]

    scale = 1.0
    for attempt in range(12):
        if complete() or kills >= 6:  # a kill can land after the finalize step
            break
        proc = subprocess.Popen([str(EXE), *args, "--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        time.sleep(rng.uniform(0.3, 0.9) * duration * scale)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            if kills == 0:  # it finished before the first kill (the machine sped up): start over, killing earlier
                shutil.rmtree(killed)
                scale /= 2
                continue
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if (killed / "zarr.json").exists():
            info = inspect_cache(killed)
            if not info["complete"]:
                assert info["state"] == f"incomplete, {info['blocks_complete']}/50 blocks"
                with pytest.raises(KdcacheError, match="incomplete cache"):
                    open_cache(killed)
    if not complete():
        subprocess.run([str(EXE), *args, "--output", str(killed)], check=True, capture_output=True, env=env)
    assert kills >= 1  # the test exercised at least one crash
    _same_arrays(open_cache(tmp_path / "ref"), open_cache(tmp_path / "killed"))
    assert verify_cache(tmp_path / "killed") == []


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def small_cache(models_dir, dataset_file, tmp_path):
    out = tmp_path / "cache"
    dump_teacher(DumpConfig(model=models_dir["t5_teacher"], dataset=dataset_file, output=str(out), topk=8, block_size=8, device="cpu"))
    return out


@pytest.mark.parametrize("array", ["target_logprobs", "target_ids", "tail_logprob", "labels", "input_ids", "label_offsets"])
def test_a_flipped_byte_is_named_by_verify_and_by_training(array, small_cache, models_dir, tmp_path, capsys):
    assert verify_cache(small_cache) == []
    _flip_byte(small_cache / "blocks" / "000002" / array / "c" / ("0/0" if array.startswith("target_ids") or array == "target_logprobs" else "0"))
    code, out, err = _cli(["verify", small_cache], capsys)
    assert code == 1
    assert f"blocks/000002/{array} chunk c/0" in err
    with pytest.raises(KdcacheError, match=f"corrupted cache: .*blocks/000002/{array}"):
        train_student(TrainConfig(cache=str(small_cache), student=models_dir["t5_student"], output=str(tmp_path / "run"), epochs=1, device="cpu"))


def test_verify_catches_inconsistent_attributes(small_cache, capsys):
    import zarr

    g = zarr.open_group(str(small_cache), mode="r+", use_consolidated=False)
    g.attrs["tokens"] = 12345
    zarr.consolidate_metadata(str(small_cache))
    problems = verify_cache(small_cache)
    assert any("attributes say 12345" in p for p in problems)


def test_inspect_json(small_cache, capsys):
    code, out, err = _cli(["inspect", "--json", small_cache], capsys)
    assert code == 0
    info = json.loads(out)
    for key in ("format", "format_version", "complete", "examples", "tokens", "bytes", "bytes_per_token", "k"):
        assert key in info
    assert info["complete"] is True and info["examples"] == 40 and info["k"] == 8
    assert info["bytes_per_token"] == pytest.approx(info["bytes"] / info["tokens"])
    assert 0 < info["captured_mass_p5"] <= info["captured_mass_mean"] < 1
    fid = info["fidelity"]
    assert fid["positions"] >= info["tokens"] // 16  # every 16th distilled position of every batch is probed
    # top-k: the probed positions' captured mass is the same statistic on a subsample; KL and TVD finite and > 0
    assert abs(fid["captured_mass"] - info["captured_mass_mean"]) < 0.1
    assert 0 < fid["tvd"] < 1 - fid["captured_mass"] + 0.01 and 0 < fid["kl"] < 20 and fid["kl_infinite_fraction"] == 0
    assert info["entries_per_token"] == 8
    code, out, err = _cli(["inspect", small_cache], capsys)
    assert code == 0 and "state             complete" in out and "bytes on disk" in out and "KL(teacher||target)" in out


def test_dump_refuses_other_parameters_and_touches_nothing(small_cache, models_dir, dataset_file, capsys):
    before = {p: p.stat().st_mtime_ns for p in small_cache.rglob("*")}
    code, out, err = _cli(["dump-teacher", "--model", models_dir["t5_teacher"], "--dataset", dataset_file, "--topk", "4",
                           "--output", small_cache], capsys)
    assert code == 2 and "already holds a complete cache" in err and len(err.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in small_cache.rglob("*")} == before


def test_train_refuses_an_incomplete_cache(small_cache, models_dir, tmp_path, capsys):
    import zarr

    g = zarr.open_group(str(small_cache), mode="r+", use_consolidated=False)
    g.attrs["complete"] = False
    zarr.consolidate_metadata(str(small_cache))
    code, out, err = _cli(["train-student", "--cache", small_cache, "--student", models_dir["t5_student"], "--output", tmp_path / "r"], capsys)
    assert code == 2 and "incomplete cache" in err
    code, out, err = _cli(["verify", small_cache], capsys)
    assert code == 1 and "incomplete" in err


def test_empty_dataset_and_remote_code_default(models_dir, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    code, out, err = _cli(["dump-teacher", "--model", models_dir["t5_teacher"], "--dataset", tmp_path / "empty.jsonl",
                           "--output", tmp_path / "c"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert DumpConfig().trust_remote_code is False and TrainConfig().trust_remote_code is False
