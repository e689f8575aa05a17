"""Finding the learning rate: each method's reading of its losses, and the command with each method on every stage
(pretraining under torchrun: one process group for all the runs), beside a run whose checkpoints it must leave
alone."""

import hashlib
import json
import math
import os
import shutil

import pytest
from conftest import CHAT, DPO_CONFIG, FAST, REPO, SFT_CONFIG, TINY_CONFIG, python, run_command, run_process

from training.lr_find import MARK, beyond_the_edge, clear, suggest, suggest_fixed


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


def test_the_fixed_rates_suggestion_is_the_vertex_of_the_parabola_through_the_best_run_and_its_neighbours():
    lrs = [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]
    def score(lr):  # a parabola in log(rate), lowest at 3e-3, and far from it another curve
        return 4.8 + (math.log(lr / 3e-3)) ** 2 if lr >= 1e-3 else 9.0
    found = suggest_fixed(lrs, [score(lr) for lr in lrs])
    assert found["best_at"] == 4e-3 and found["lr"] == pytest.approx(3e-3, rel=1e-9)
    # a neighbour that diverged: the best run itself; no finite run at all: a one-line error
    assert suggest_fixed(lrs, [5, 4, 3, math.nan, 6])["lr"] == 2e-3
    with pytest.raises(Exception, match="no run had a finite loss"):
        suggest_fixed(lrs, [math.nan] * 5)
    # the best at an edge: the grid grows by one of its steps on that side, and stops growing inside
    assert beyond_the_edge(lrs, [5, 4, 3, 2, 1]) == [pytest.approx(1.6e-2)]
    assert beyond_the_edge(lrs, [1, 2, 3, 4, math.nan]) == [pytest.approx(2.5e-4)]
    assert beyond_the_edge([*lrs, 1.6e-2], [5, 4, 3, 2, 1, math.nan]) == []  # the rate beyond diverged: it bounds
    assert beyond_the_edge(lrs, [5, 2, 3, 4, 6]) == []
    edge = suggest_fixed(lrs, [5, 4, 3, 2, 1])
    assert edge["lr"] == 8e-3 and "widen --lrs" in edge["rule"]


def test_an_earlier_calls_runs_are_cleared_and_anything_else_in_their_place_is_refused(tmp_path):
    from preprocess.errors import UserError

    out = tmp_path / "out"

    def marked(name):
        (out / name).mkdir(parents=True)
        (out / name / MARK).touch()
        (out / name / "metrics.jsonl").write_text("{}")

    marked("lr-0")
    marked("sweep")  # an earlier call's runs
    (out / "lr_find.json").write_text("{}")
    (out / "notes").mkdir()
    (out / "lr-2e-4").mkdir()  # a user's run, by another name pattern: not lr_find's to touch
    clear(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["lr-2e-4", "notes"]
    # in lr_find's places: a directory without the mark, or one with checkpoints (lr_find writes none), is refused
    # in one line — and nothing is deleted, also what sorts before it
    marked("lr-0")
    (out / "sweep").mkdir()
    with pytest.raises(UserError, match=r"sweep, where lr_find would write, has no .lr_find mark.*rm -r"):
        clear(str(out))
    assert (out / "lr-0" / MARK).exists() and (out / "sweep").exists()
    (out / "sweep").rmdir()
    marked("lr-1")
    (out / "lr-1" / "checkpoints").mkdir()
    with pytest.raises(UserError, match=r"lr-1 holds checkpoints"):
        clear(str(out))
    assert (out / "lr-0" / MARK).exists() and (out / "lr-1" / "checkpoints").exists()


def digests(directory) -> dict:
    return {os.path.relpath(os.path.join(d, f), directory): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(directory) for f in files}


def lr_find(*args, nproc=1):
    if nproc > 1:  # torchrun itself: the one test that runs a training command under it, with its agent's store
        proc = run_process([*python(nproc), "-m", "training.lr_find", *args], cwd=REPO)
    else:
        proc = run_command("-m", "training.lr_find", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_both_methods_suggest_a_rate_on_every_stage_and_leave_out_dirs_checkpoints_alone(
        pretrain_shards, chat_shards, sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)  # a finished run with checkpoints, as out_dir
    before = digests(run / "checkpoints")
    stages = {
        "pretrain": (TINY_CONFIG, [f"data.path={pretrain_shards}", *FAST], 2),  # torchrun: one group, several runs
        "sft": (SFT_CONFIG, [f"data.path={chat_shards['sft']}", f"init_from={sft_run}", *CHAT], 1),
        "dpo": (DPO_CONFIG, [f"data.path={chat_shards['dpo']}", f"init_from={sft_run}", *CHAT], 1),
    }
    sweep = ["--method", "sweep", "--steps", "30", "--min-lr", "1e-5", "--max-lr", "3"]
    fixed = ["--steps", "10", "--lrs", "1e-4,1e-3,1e-2"]  # the default method; three rates, ten steps: seconds
    for stage, (config, overrides, nproc) in stages.items():
        for method, flags in (("fixed", fixed), ("sweep", sweep)):
            if stage == "sft" and method == "sweep":
                continue  # the sweep's path through the loop is the stage's own: pretrain and DPO show it
            proc = lr_find("--config", config, *flags, f"out_dir={run}", *overrides, nproc=nproc)
            report = json.load(open(run / "lr_find" / "lr_find.json"))
            assert report["stage"] == stage and report["method"] == method
            assert f"suggested train.lr={report['suggested_lr']:.3g}" in proc.stdout
            assert (run / "lr_find" / "lr_find.png").stat().st_size > 10_000
            if method == "sweep":
                assert len(report["lr"]) == 30 and not (run / "lr_find" / "sweep" / "checkpoints").exists()
                assert report["lr"][0] == pytest.approx(1e-5) and report["lr"][-1] == pytest.approx(3)
                assert 1e-6 <= report["suggested_lr"] <= 0.3
                assert not list((run / "lr_find").glob("lr-*"))  # the fixed method's runs: cleared
            else:
                assert report["lr"][:3] == [1e-4, 1e-3, 1e-2] and len(report["lr"]) == len(report["scores"])
                assert report["score"] == "val_loss" and all(v is not None for v in report["scores"])
                assert 1e-4 / 8 <= report["suggested_lr"] <= 1e-2 * 8
                runs = sorted((run / "lr_find").glob("lr-*"))
                assert len(runs) == len(report["lr"]) and not any((d / "checkpoints").exists() for d in runs)
                for d, lr in zip(runs, report["lr"], strict=True):  # each run at its rate, its whole length
                    steps = [json.loads(line) for line in open(d / "metrics.jsonl") if '"loss"' in line]
                    assert len(steps) == 10 and max(r["lr"] for r in steps) == pytest.approx(lr)
            assert digests(run / "checkpoints") == before, stage  # the run's own checkpoints: untouched
    # a second call starts afresh: the same losses again
    first = json.load(open(run / "lr_find" / "lr_find.json"))["loss"]
    lr_find("--config", DPO_CONFIG, *sweep, f"out_dir={run}", *stages["dpo"][1])
    assert json.load(open(run / "lr_find" / "lr_find.json"))["loss"] == first
    # a directory holding a run's checkpoints is refused, in one line, before any work
    proc = run_command("-m", "training.lr_find", "--config", DPO_CONFIG, "--out", run, f"out_dir={tmp_path / 'other'}",
                       *stages["dpo"][1], timeout=120)
    assert proc.returncode == 1 and "holds a run's checkpoints" in proc.stderr and "Traceback" not in proc.stderr
    assert digests(run / "checkpoints") == before
