"""The sandbox that runs model-written code, and HumanEval pass@k."""

import json
from math import comb

import pytest
from conftest import run_cli

from kdcache.humaneval import execute, pass_at_k, problems, truncate
from kdcache.sandbox import Limits, _pids_cgroup_root, run_program

LIMITS = Limits(timeout=3.0, memory_mb=512, max_processes=16)


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(20, 0, 1), (20, 3, 1), (20, 3, 10), (10, 10, 5), (7, 2, 7), (200, 17, 100)]:
        expected = 1.0 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_canonical_solutions_pass_and_wrong_ones_fail():
    probs = problems()
    assert len(probs) == 164
    outcomes = execute([(p, p["canonical_solution"]) for p in probs], LIMITS)
    failed = [p["task_id"] for p, (ok, _) in zip(probs, outcomes) if not ok]
    assert failed == []
    wrong = execute([(p, "    return None\n") for p in probs[:10]], LIMITS)
    assert not any(ok for ok, _ in wrong)


def test_stop_sequences_cut_the_completion():
    assert truncate("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert truncate("    return x\nif __name__ == '__main__':\n    main()") == "    return x"


def test_an_infinite_loop_times_out():
    out = run_program("while True:\n    pass", LIMITS)
    assert not out.passed and out.result == "timed out"


def test_a_memory_bomb_fails_within_the_limit():
    out = run_program("x = bytearray(8 * 2**30)", LIMITS)
    assert not out.passed and "MemoryError" in out.result


def test_a_fork_bomb_is_stopped():
    out = run_program("import os\nwhile True:\n    os.fork()", LIMITS)
    assert not out.passed  # the guard removed os.fork


@pytest.mark.skipif(_pids_cgroup_root() is None, reason="no writable pids cgroup (needs root): the OS-level process limit is not available here")
def test_a_fork_bomb_past_the_guard_hits_the_process_limit():
    out = run_program("import os\nwhile True:\n    os.fork()", LIMITS, guard=False)
    assert not out.passed and ("BlockingIOError" in out.result or out.result == "timed out")


@pytest.mark.parametrize("code", [
    "import os; os.remove(TARGET)",
    "import os; os.unlink(TARGET)",
    "import shutil; shutil.rmtree(DIR)",
    "open(TARGET, 'w').write('overwritten')",
    "import io; io.open(TARGET, 'a').write('appended')",
    "import subprocess; subprocess.run(['rm', '-f', TARGET])",
    "import os; os.system('rm -f ' + TARGET)",
    "import os; os.rename(TARGET, TARGET + '.moved')",
])
def test_files_outside_the_working_directory_cannot_be_deleted_or_overwritten(code, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = run_program(f"TARGET = {str(target)!r}\nDIR = {str(tmp_path)!r}\n{code}", LIMITS)
    assert not out.passed
    assert target.read_text() == "keep me"


def test_writing_inside_the_working_directory_works():
    assert run_program("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'", LIMITS).passed


def test_pass_at_k_refused_without_permission(models_dir, capsys, monkeypatch):
    monkeypatch.delenv("KDCACHE_ALLOW_CODE_EXECUTION", raising=False)
    code, out, err = run_cli(["evaluate", "--model", models_dir["gpt2_teacher"], "--metric", "pass@k", "--limit", "1"], capsys)
    assert code == 2 and "--allow-code-execution" in err and len(err.strip().splitlines()) == 1


def test_pass_at_k_end_to_end_matches_the_estimator_on_its_samples(models_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDCACHE_ALLOW_CODE_EXECUTION", "1")
    code, out, err = run_cli(["evaluate", "--model", models_dir["gpt2_student"], "--metric", "pass@k", "--limit", 2, "--num-samples", 3,
                              "--k", "1,2", "--max-new-tokens", 16, "--output", tmp_path / "he"], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "he" / "results.json").read_text())
    samples = [json.loads(line) for line in open(tmp_path / "he" / "humaneval_results" / "samples.jsonl")]
    assert len(samples) == 6 and {"task_id", "completion", "passed", "result"} <= set(samples[0])
    for k in (1, 2):
        by_task = {}
        for s in samples:
            by_task.setdefault(s["task_id"], []).append(s["passed"])
        expected = sum(1 - comb(len(v) - sum(v), k) / comb(len(v), k) for v in by_task.values()) / len(by_task)
        assert results[f"pass@{k}"] == pytest.approx(expected)
