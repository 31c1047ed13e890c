"""`kdcache quickstart --budget tiny`: the README's main command as a smoke test, with the bundled teacher."""

import json

from conftest import run_cli

from pipelines.quickstart import TEACHER


def test_bundled_teacher_is_small_float16_safetensors_with_a_model_card():
    files = {p.name: p for p in TEACHER.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    assert files["model.safetensors"].stat().st_size <= 10 * 2**20
    card = files["README.md"].read_text()
    assert "Held-out loss" in card and "pipelines/train_quickstart_teacher.py" in card
    assert json.loads(files["config.json"].read_text())["dtype"] in ("float16", "torch.float16")


def test_quickstart_tiny_runs_offline_and_reports_every_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(["quickstart", "--budget", "tiny", "--output", tmp_path / "qs", "--device", "cpu"], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    for name in ("teacher", "student_ce", "student_kd"):
        assert {"loss", "perplexity", "top1_agreement"} <= set(results[name])
        assert 0 < results[name]["loss"] < 10
    assert results["teacher"]["top1_agreement"] == 1.0
    assert results["teacher"]["loss"] < results["student_ce"]["loss"]  # the bundled teacher is a real model
    assert (tmp_path / "qs" / "results.png").stat().st_size > 0
    assert "student_kd" in out and "results.json" in out
    code, out, err = run_cli(["quickstart", "--budget", "tiny", "--output", tmp_path / "qs"], capsys)
    assert code == 2 and "--overwrite" in err  # an earlier run is not silently replaced
