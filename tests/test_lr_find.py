"""The learning-rate range test: its reading of a curve, and the command on every stage, under torchrun, beside a
run whose checkpoints it must leave alone."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import CHAT, DPO_CONFIG, FAST, REPO, SFT_CONFIG, TINY_CONFIG

from training.lr_find import suggest


def test_the_suggestion_is_the_knee_of_the_smoothed_loss_before_divergence():
    lrs = [1e-5 * 10 ** (6 * i / 299) for i in range(300)]  # 1e-5 .. 10
    # falls by 3 nats until 1e-2 (linearly in log lr), flat with noise up to 1e-1, rises, then explodes past 1
    losses = [5 - 3 * min(1.0, math.log10(lr / 1e-5) / 3) + 0.05 * math.sin(i) + max(0.0, math.log10(lr / 1e-1)) * 2
              + (math.inf if lr > 1 else 0) for i, lr in enumerate(lrs)]
    found = suggest(lrs, losses)
    assert 1.2e-2 <= found["lowest_at"] <= 1e-1  # somewhere on the flat stretch: noise decides where
    assert 6e-3 <= found["lr"] <= 9e-3  # 95% of the 3-nat fall: 10 ** (-5 + 0.95 * 3) = 7.1e-3
    assert found["diverged_at"] == min(lr for lr in lrs if lr > 1)  # the first non-finite loss
    still_falling = suggest(lrs[:100], [5 - i / 100 for i in range(100)])
    assert "still falling" in still_falling["rule"] and still_falling["diverged_at"] is None


def digests(directory) -> dict:
    return {os.path.relpath(os.path.join(d, f), directory): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(directory) for f in files}


def lr_find(*args, nproc=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, "-m", "training.lr_find", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_pretrain_sft_and_dpo_sweeps_suggest_a_rate_and_leave_out_dirs_checkpoints_alone(
        pretrain_shards, chat_shards, sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)  # a finished run with checkpoints, as out_dir
    before = digests(run / "checkpoints")
    sweeps = {
        "pretrain": (TINY_CONFIG, [f"data.path={pretrain_shards}", *FAST], 2),
        "sft": (SFT_CONFIG, [f"data.path={chat_shards['sft']}", f"init_from={sft_run}", *CHAT], 1),
        "dpo": (DPO_CONFIG, [f"data.path={chat_shards['dpo']}", f"init_from={sft_run}", *CHAT], 1),
    }
    for stage, (config, overrides, nproc) in sweeps.items():
        proc = lr_find("--config", config, "--steps", "30", "--min-lr", "1e-5", "--max-lr", "3", f"out_dir={run}",
                       *overrides, nproc=nproc)
        report = json.load(open(run / "lr_find" / "lr_find.json"))
        assert report["stage"] == stage and len(report["lr"]) == 30
        assert report["lr"][0] == pytest.approx(1e-5) and report["lr"][-1] == pytest.approx(3)
        assert 1e-6 <= report["suggested_lr"] <= 0.3 and f"suggested train.lr={report['suggested_lr']:.3g}" in proc.stdout
        assert (run / "lr_find" / "lr_find.png").stat().st_size > 10_000
        assert not (run / "lr_find" / "checkpoints").exists()
        assert digests(run / "checkpoints") == before, stage  # the run's own checkpoints: untouched
    # a second sweep starts afresh: the same losses again
    first = json.load(open(run / "lr_find" / "lr_find.json"))["loss"]
    lr_find("--config", DPO_CONFIG, "--steps", "30", "--min-lr", "1e-5", "--max-lr", "3", f"out_dir={run}",
            *sweeps["dpo"][1])
    assert json.load(open(run / "lr_find" / "lr_find.json"))["loss"] == first
    # a directory holding a run's checkpoints is refused, in one line, before any work
    proc = subprocess.run([sys.executable, "-m", "training.lr_find", "--config", DPO_CONFIG, "--out", str(run),
                           f"out_dir={tmp_path / 'other'}", *sweeps["dpo"][1]], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "holds a run's checkpoints" in proc.stderr and "Traceback" not in proc.stderr
    assert digests(run / "checkpoints") == before
