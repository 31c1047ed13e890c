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
