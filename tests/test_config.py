"""Config files, command-line overrides, dry runs, and the run folder's contents."""

import json

import pytest
from conftest import run_cli

from kdcache.config import FILE_DEFAULTS, TrainConfig, load_config_file, stage_kwargs


def test_create_config_writes_every_section_with_the_workflow_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["create-config"], capsys)
    assert code == 0
    cfg = json.loads((tmp_path / "distillation_config.json").read_text())
    assert list(cfg) == ["model_config", "data_config", "distillation_config", "training_config", "system_config"]
    assert cfg["model_config"]["teacher_model"] == "t5-large" and cfg["model_config"]["student_model"] == "t5-small"
    assert (cfg["model_config"]["max_input_length"], cfg["model_config"]["max_target_length"]) == (512, 128)
    assert cfg["data_config"]["dataset_name"] == "cnn_dailymail" and cfg["data_config"]["dataset_version"] == "3.0.0"
    assert (cfg["data_config"]["train_size"], cfg["data_config"]["val_size"], cfg["data_config"]["test_size"]) == (1000, 200, 100)
    assert cfg["distillation_config"] == {"temperature": 4.0, "alpha": 0.7, "beta": 0.3}
    t = cfg["training_config"]
    assert (t["batch_size"], t["learning_rate"], t["num_epochs"], t["warmup_steps"]) == (4, 5e-5, 3, 500)
    assert (t["logging_steps"], t["save_steps"], t["eval_steps"], t["gradient_accumulation_steps"], t["max_grad_norm"]) == (100, 1000, 500, 4, 1.0)
    s = cfg["system_config"]
    assert s["mixed_precision"] is True and s["dry_run"] is False and s["seed"] == 42 and s["log_level"] == "INFO"
    # the file's defaults are the dataclasses' (one source)
    assert t["learning_rate"] == TrainConfig().lr and cfg["distillation_config"]["alpha"] == TrainConfig().alpha
    code, out, err = run_cli(["create-config"], capsys)
    assert code == 2 and "exists" in err
    code, out, err = run_cli(["create-config", "cfg.yaml"], capsys)
    assert code == 0 and load_config_file(str(tmp_path / "cfg.yaml")) == FILE_DEFAULTS


@pytest.mark.parametrize("patch, message", [
    ({"training_config": {"lerning_rate": 1e-4}}, "unknown key training_config.lerning_rate"),
    ({"trainer": {}}, "unknown section 'trainer'"),
    ({"training_config": {"learning_rate": -1.0}}, "training_config.learning_rate = -1.0 is invalid"),
    ({"distillation_config": {"temperature": "hot"}}, "distillation_config.temperature = 'hot' has the wrong type"),
    ({"training_config": {"batch_size": 0}}, "training_config.batch_size = 0 is invalid"),
    ({"data_config": {"train_size": 0}}, "data_config.train_size = 0 is invalid"),
])
def test_bad_config_files_are_refused_naming_the_key(patch, message, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(patch))
    code, out, err = run_cli(["train-student", "--config", path], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_config_file_drives_a_run_and_the_command_line_overrides_it(models_dir, dataset_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = json.loads(json.dumps(FILE_DEFAULTS))
    cfg["model_config"].update(teacher_model=models_dir["t5_teacher"], student_model=models_dir["t5_student"], cache_dir="cache")
    cfg["data_config"].update(dataset_name=dataset_file, train_size=16, num_workers=0)
    cfg["training_config"].update(output_dir="run", warmup_steps=1, logging_steps=1, gradient_accumulation_steps=1, save_steps=3)
    cfg["system_config"]["device"] = "cpu"
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert stage_kwargs(load_config_file("c.json"), "train")["checkpoint_dir"] == "run/checkpoints"
    code, out, err = run_cli(["dump-teacher", "--config", "c.json", "--topk", "4"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "cache" / "zarr.json").read_text())["attributes"]["num_examples"] == 16  # train_size
    code, out, err = run_cli(["train-student", "--config", "c.json", "--max-steps", "5", "--batch-size", "2"], capsys)
    assert code == 0, err
    hist = json.loads((tmp_path / "run" / "logs" / "training_metrics.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]  # logging_steps=1 from the file, max-steps from the command line
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-step-3").is_dir()  # save_steps from the file
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"final_model", "checkpoints", "logs"}
    assert {p.name for p in (tmp_path / "run" / "logs").iterdir()} >= {"main.log", "training.log", "training_metrics.json", "training_metrics.jsonl", "curves.png"}
    (tmp_path / "run" / "logs" / "curves.png").unlink()
    code, out, err = run_cli(["plot", "run"], capsys)
    assert code == 0 and (tmp_path / "run" / "logs" / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("args", [["dump-teacher", "--dry-run"], ["train-student", "--dry-run"], ["evaluate", "--dry-run", "--model", "distilgpt2"]])
def test_dry_run_needs_no_other_option_and_no_download(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "dump" in out and "train" in out and "evaluate" in out and "nothing was kept on disk" in out
    assert ("t5 family" in out) == (args[0] != "evaluate")
    assert list(tmp_path.iterdir()) == []  # nothing written where the user stands
