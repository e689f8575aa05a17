import json
import os
import subprocess
import sys

from conftest import CHAT, DPO_CONFIG, REPO, run_training


def report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.report", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)


def test_report_plots_and_summarises_one_run_and_compares_several(chat_shards, sft_run, tmp_path):
    from PIL import Image

    dpo = tmp_path / "dpo"
    run_training(f"data.path={chat_shards['dpo']}", f"init_from={sft_run}", "train.max_steps=3", f"out_dir={dpo}",
                 *CHAT, "train.eval_every=3", stage="dpo", config=DPO_CONFIG)
    pretrain = os.path.join(os.path.dirname(sft_run), "pretrain")
    proc = report(pretrain, dpo, "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in open(dpo / "metrics.jsonl")]
    last = [r for r in records if "loss" in r][-1]
    md = (dpo / "report.md").read_text()
    assert f"→ {last['loss']:.4f}" in md
    assert f"reward margin {last['rewards/margins']:.3f}, accuracy {last['rewards/accuracies']:.2f}" in md
    assert "DPO" not in open(os.path.join(pretrain, "report.md")).read()
    for png in (dpo / "report.png", os.path.join(pretrain, "report.png"), tmp_path / "cmp" / "compare.png"):
        width, height = Image.open(png).size
        assert width > 500 and height > 300
    # the DPO run has two more panels (rewards, accuracy): a taller figure than the pretraining run's
    assert Image.open(dpo / "report.png").size[1] > Image.open(os.path.join(pretrain, "report.png")).size[1]
    compare = (tmp_path / "cmp" / "compare.md").read_text()
    assert compare.index(f"## {pretrain}") < compare.index(f"## {dpo}")


def test_report_of_a_directory_without_metrics_is_one_line(tmp_path):
    proc = report(tmp_path)
    assert proc.returncode == 1 and proc.stderr == f"error: {tmp_path}: no metrics.jsonl (not a run directory?)\n"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n')
    proc = report(tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {tmp_path}/metrics.jsonl:2: not JSON")
