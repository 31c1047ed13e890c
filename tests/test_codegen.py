"""The code-generation workflow: CodeSearchNet-style data, the alpha convention, tokenizer checks,
Trainer-style outputs, the recipe and the sbatch script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import _gpt2, _save, _train_tokenizer, run_cli, stdlib_functions

from pipelines import codegpt_codesearchnet as recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def csn(tmp_path_factory):
    """A save_to_disk folder with CodeSearchNet-Python's columns and splits, from stdlib functions."""
    rows = [{"whole_func_string": r["article"], "func_code_string": r["article"], "func_documentation_string": r["highlights"]}
            for r in stdlib_functions(40)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path_factory.mktemp("csn") / "csn"
    datasets.DatasetDict({"train": ds.select(range(24)), "validation": ds.select(range(24, 32)),
                          "test": ds.select(range(32, 40))}).save_to_disk(str(path))
    return str(path)


def test_alpha_convention_maps_ce_weight_to_kdcache_beta():
    assert recipe.kdcache_weights(0.5) == {"alpha": 0.5, "beta": 0.5}
    assert recipe.kdcache_weights(0.0) == {"alpha": 1.0, "beta": 0.0}  # pure distillation
    assert recipe.kdcache_weights(0.3) == pytest.approx({"alpha": 0.7, "beta": 0.3})
    with pytest.raises(ValueError):
        recipe.kdcache_weights(1.5)


def test_vocabulary_mismatch_is_refused_before_any_dump(models_dir, csn, tmp_path, capsys):
    other_tok = _train_tokenizer("gpt2", vocab_size=350)
    other = _save(_gpt2(other_tok, 32, 1, 0), other_tok, tmp_path / "other_student")
    capsys.readouterr()  # the save's own progress output is not the CLI's
    code, out, err = run_cli(["dump-teacher", "--model", models_dir["gpt2_teacher"], "--student", other, "--dataset", csn,
                              "--output", tmp_path / "cache"], capsys)
    assert code == 2 and "different tokenizers" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def test_codesearchnet_columns_and_max_seq_length(models_dir, csn, tmp_path, capsys):
    code, out, err = run_cli(["dump-teacher", "--model", models_dir["gpt2_teacher"], "--student", models_dir["gpt2_student"],
                              "--dataset", csn, "--max-seq-length", 64, "--topk", 4, "--output", tmp_path / "c"], capsys)
    assert code == 0, err
    from kdcache import open_cache

    cache = open_cache(tmp_path / "c")
    assert cache.meta["dataset"]["columns"]["text"] == "whole_func_string"  # found without --text-column
    assert max(len(cache[i]["input_ids"]) for i in range(len(cache))) == 64
    assert cache.meta["preprocessing"]["truncated_inputs"] > 0


def test_recipe_end_to_end_with_trainer_style_outputs(models_dir, csn, tmp_path):
    args = recipe.parser().parse_args([
        "--teacher", models_dir["gpt2_teacher"], "--student", models_dir["gpt2_student"], "--dataset", csn,
        "--max-seq-length", "96", "--max-steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--eval-steps", "2",
        "--logging-steps", "1", "--device", "cpu", "--output", str(tmp_path / "run"), "--allow-code-execution",
        "--humaneval-limit", "2", "--num-samples", "2", "--k", "1,2", "--max-new-tokens", "8",
    ])
    result = recipe.run(args)
    assert result["train"]["steps"] == 4
    assert {"perplexity", "loss"} <= set(result["results"]["perplexity"])
    assert {"pass@1", "pass@2"} <= set(result["results"]["humaneval"])
    final = tmp_path / "run" / "student" / "final_model"
    files = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "train_results.json", "eval_results.json"} <= files
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert "eval_loss" in json.loads((final / "eval_results.json").read_text())


def test_sbatch_script_runs_under_plain_bash(models_dir, csn, tmp_path):
    env = {**os.environ, "TEACHER": models_dir["gpt2_teacher"], "STUDENT": models_dir["gpt2_student"], "DATASET": csn,
           "MAX_SEQ_LENGTH": "64", "MAX_STEPS": "2", "EVAL_LIMIT": "4", "DEVICE": "cpu", "RUN": str(tmp_path / "run"),
           "KDCACHE": str(Path(sys.executable).parent / "kdcache"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", str(REPO / "pipelines" / "slurm" / "distill.sbatch")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "student" / "final_model" / "model.safetensors").exists()
    assert "perplexity" in json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
