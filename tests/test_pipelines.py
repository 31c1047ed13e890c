"""The recipes in pipelines/ run end to end with tiny local models and local data."""

import json

import datasets

from kdcache.config import FILE_DEFAULTS
from pipelines import t5_cnndm


def test_t5_cnndm_recipe_end_to_end(models_dir, dataset_file, tmp_path):
    rows = [json.loads(line) for line in open(dataset_file)]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds.select(range(24)), "validation": ds.select(range(24, 32)),
                          "test": ds.select(range(32, 40))}).save_to_disk(str(tmp_path / "cnndm"))
    cfg = json.loads(json.dumps(FILE_DEFAULTS))
    cfg["model_config"].update(teacher_model=models_dir["t5_teacher"], student_model=models_dir["t5_student"],
                               max_input_length=128, max_target_length=32)
    cfg["data_config"].update(dataset_name=str(tmp_path / "cnndm"), train_size=16, val_size=8, test_size=4, num_workers=0)
    cfg["training_config"].update(num_epochs=2, warmup_steps=1, eval_steps=2, gradient_accumulation_steps=1, logging_steps=1)
    result = t5_cnndm.run(cfg, str(tmp_path / "out"), device="cpu")
    assert result["train"]["steps"] == 8 and result["train"]["best_model"]
    for name in ("teacher", "student"):
        assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"} <= set(result["comparison"][name])
        assert result["comparison"][name]["examples"] == 4
    assert json.loads((tmp_path / "out" / "comparison.json").read_text()) == result["comparison"]
    run_dir = tmp_path / "out" / "student"
    assert {"final_model", "best_model", "logs"} <= {p.name for p in run_dir.iterdir()}


def test_sparse_targets_study_runs_end_to_end(tmp_path, monkeypatch):
    """The study at a toy size: every kind trains, the table has every row, and the measurements are sane."""
    import sys

    from pipelines import quickstart, sparse_targets_study

    monkeypatch.setitem(quickstart.BUDGETS, "tiny", quickstart.Budget(train_examples=64, eval_examples=16, steps=4, batch_size=8))
    monkeypatch.setattr(sys, "argv", ["study", "--output", str(tmp_path), "--budget", "tiny"])
    sparse_targets_study.main()
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["rows"]) == {"teacher", *sparse_targets_study.RUNS}
    assert res["rows"]["teacher"]["top1_agreement"] == 1.0
    for r in res["rows"].values():
        assert r["loss"] > 0 and 0 <= r["ece"] <= 1
    st = res["storage"]
    assert st["top8"]["bytes_per_token"] < st["top64"]["bytes_per_token"] and st["top64"]["entries_per_token"] == 64
    assert st["top64"]["fidelity"]["tvd"] < st["top8"]["fidelity"]["tvd"] and st["sample"]["fidelity"]["kl"] is None
    for angles in res["gradient_angles_deg"].values():
        assert all(0 <= a <= 180 for a in angles.values()) and set(angles) == {"CE only", *sparse_targets_study.CACHES}
    assert (tmp_path / "results.md").read_text().count("\n") == len(res["rows"]) + 2


def test_bench_quick_writes_every_key(tmp_path):
    """The benchmark at a toy size: it runs, and its JSON has the keys users and CI read (the values are
    measurements of a shared machine, so only their sanity is asserted, never a speed)."""
    from pipelines import bench

    out = tmp_path / "bench.json"
    bench.main(["--quick", "--examples", "48", "--steps", "2", "--device", "cpu", "--json", str(out)])
    r = json.loads(out.read_text())
    keys = ("device", "dump_tokens_per_s", "forward_tokens_per_s", "dump_vs_forward", "kd_step_s", "ce_step_s", "kd_vs_ce_step",
            "online_kd_step_s", "online_vs_offline_step", "kd_vs_ce_peak_memory", "loader_tokens_per_s", "bytes_per_token")
    for key in keys:
        assert key in r, key
    assert all(r[k] > 0 for k in keys if k != "device")
    assert r["dump_vs_forward"] == r["dump_tokens_per_s"] / r["forward_tokens_per_s"]
    assert r["bytes_per_token"] > 64 * 2  # 64 ids of 2 bytes at least, before the log-probs
