import importlib.util
import json
import os
import subprocess
import sys

from conftest import CHAT, DPO_CONFIG, FAST, REPO, TINY_CONFIG, losses, run_command, run_training, training_command


def report(*args) -> subprocess.CompletedProcess:
    return run_command("-m", "training.report", *args)


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


# A stand-in for the wandb package (not a dependency): records every call in a JSON lines file, so the test sees
# exactly what a run sends to Weights & Biases.
FAKE_WANDB = '''
import json, os, uuid

class util:
    @staticmethod
    def generate_id():
        return uuid.uuid4().hex[:8]

def _record(**kw):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(kw) + "\\n")

class _Run:
    def log(self, data, step=None):
        _record(call="log", data=data, step=step)
    def finish(self, exit_code=None):
        _record(call="finish", exit_code=exit_code)

def init(**kw):
    _record(call="init", **{k: v for k, v in kw.items() if k != "config"}, config_keys=sorted(kw["config"]))
    return _Run()
'''


def test_weights_and_biases_gets_the_metrics_and_a_resumed_run_continues_the_same_wandb_run(pretrain_shards, tmp_path):
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    calls_file = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fake'}", "FAKE_WANDB_LOG": str(calls_file)}
    out = tmp_path / "run"
    common = [f"data.path={pretrain_shards}", f"out_dir={out}", "log.wandb=true", "log.wandb_project=test-proj"]
    for steps in (2, 4):  # a second invocation resumes at step 2 (processes of their own: PYTHONPATH is read at start)
        command = [sys.executable, "-m", "training.pretrain", "--config", TINY_CONFIG, *FAST, *common,
                   f"train.max_steps={steps}"]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in open(calls_file)]
    inits = [c for c in calls if c["call"] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["project"] == "test-proj" and {"model", "train", "data"} <= set(inits[0]["config_keys"])
    logged = {c["step"]: c["data"]["loss"] for c in calls if c["call"] == "log" and "loss" in c["data"]}
    assert logged == losses(out) and set(logged) == {1, 2, 3, 4}
    val = {c["step"]: c["data"]["val_loss"] for c in calls if c["call"] == "log" and "val_loss" in c["data"]}
    assert val == losses(out, "val_loss") and set(val) == {0, 2, 4}
    assert [c.get("exit_code") for c in calls if c["call"] == "finish"] == [0, 0]
    # a run that fails is finished as failed (W&B shows it crashed, not finished)
    failing = training_command(f"data.path={pretrain_shards}", f"out_dir={tmp_path / 'failing'}", "log.wandb=true",
                               "train.max_steps=3", "train.max_nonfinite_steps=1", hooks="nan@1")
    proc = subprocess.run(failing, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 1 and "not finite for 1 steps in a row" in proc.stderr
    calls = [json.loads(line) for line in open(calls_file)]
    assert [c.get("exit_code") for c in calls if c["call"] == "finish"] == [0, 0, 1]

    # without the package: one line before any work, and W&B stays off by default
    if importlib.util.find_spec("wandb") is None:
        proc = run_training(f"data.path={pretrain_shards}", f"out_dir={tmp_path / 'none'}", "log.wandb=true",
                            "train.max_steps=1", check=False)
        assert proc.returncode == 1 and "log.wandb=true needs the wandb package" in proc.stderr
        assert "Traceback" not in proc.stderr
    run_training(f"data.path={pretrain_shards}", f"out_dir={tmp_path / 'default'}", "train.max_steps=1")


def test_report_draws_and_summarises_each_source_and_bits_per_byte(tmp_path):
    from PIL import Image

    lines = [{"step": 0, "val_loss": 5.0, "val_loss/web": 4.0, "val_loss/code": 6.0, "val_bpb": 2.5},
             {"step": 1, "loss": 5.5, "lr": 1e-3, "grad_norm": 1.0, "tokens": 64, "tokens_per_sec": 10.0,
              "padding_share": 0.25},
             {"step": 1, "val_loss": 4.5, "val_loss/web": 3.5, "val_loss/code": 5.5, "val_bpb": 2.25}]
    one, two = tmp_path / "one", tmp_path / "two"
    for run, records in ((one, lines), (two, [r for r in lines if "val_loss/web" not in r])):
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        assert report(run).returncode == 0
    md = (one / "report.md").read_text()
    assert "- val_loss/web: 4.0000 → 3.5000" in md and "- val_loss/code: 6.0000 → 5.5000" in md
    assert "- val_bpb: 2.5000 → 2.2500" in md and "padding: 25.0% of the positions" in md
    # the per-source panel is drawn only where there are sources
    assert Image.open(one / "report.png").size[1] > Image.open(two / "report.png").size[1]
