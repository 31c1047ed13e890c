"""The documentation's code runs: docs/cache-format.md's plain-zarr reader reads a real cache."""

import re
from pathlib import Path

import numpy as np

from kdcache import DumpConfig, dump_teacher, open_cache

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cache_format_snippet_reads_a_cache_with_zarr_alone(models_dir, dataset_file, tmp_path, monkeypatch):
    dump_teacher(DumpConfig(model=models_dir["t5_teacher"], dataset=dataset_file, output=str(tmp_path / "teacher_cache"),
                            topk=8, limit=10, block_size=4, device="cpu"))
    code = re.findall(r"```python\n(.*?)```", (DOCS / "cache-format.md").read_text(), re.DOTALL)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "cache-format.md", "exec"), scope)
    cache = open_cache(tmp_path / "teacher_cache")
    for i in (0, 5, 9):
        got, ref = scope["example"](i), cache[i]
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key])
