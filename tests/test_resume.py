"""Resuming as cluster users do: on another number of processes (DDP and DeepSpeed ZeRO), with another global
batch, after the starting run moved on; what a resume refuses; one run per out_dir."""

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import (
    CHAT,
    DPO_CONFIG,
    FAST,
    REPO,
    SFT_CONFIG,
    kill_after_first_checkpoint,
    losses,
    private_copy,
    run_training,
    shakespeare_plays,
    start_training,
    training_command,
    write_jsonl,
)

from preprocess.__main__ import main as preprocess_main

STOPPED = 128 + signal.SIGTERM  # exit code of a run stopped by a preemption notice (its checkpoint is written)
BACKENDS = {"ddp": [], "zero2": ["dist.backend=deepspeed", "dist.zero_stage=2"], "zero3": None,  # zero3: the fixture
            # FSDP2's checkpoints written in the background, the one at a stop signal complete before the exit
            "fsdp2": ["dist.backend=fsdp2", "train.async_checkpoint=true"]}


def state(run_dir, step: int) -> dict:
    return json.load(open(os.path.join(run_dir, "checkpoints", f"step-{step}", "state.json")))


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_then_one_then_two_processes_with_the_same_global_batch_equal_an_uninterrupted_run(
        backend, pretrain_shards, zero3, tmp_path):
    """Each segment is stopped as a preemption stops it (SIGTERM: checkpoint at the step boundary), then run
    again on another number of processes; DeepSpeed converts its partitioned checkpoint to a universal one, FSDP2
    reads its DCP checkpoint as it is, each rank the pieces of its own shards. DDP and FSDP2 train with Muon (its
    momentum is the state to restore); ZeRO-3 and FSDP2 run a mixture-of-experts block beside a dense one (its stacked
    experts are partitioned too), the first block's activations recomputed in the backward (the weights gathered
    again for the recomputation)."""
    if backend in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (the dev extra installs it)")
    moe = ["model.moe.experts=4", "model.moe.every=2", "model.moe.shared_experts=1",
           "train.activation_checkpointing=every_n"] if backend in ("zero3", "fsdp2") else []
    muon = ["train.optimizer=muon"] if backend in ("ddp", "fsdp2") else []
    common = [f"data.path={pretrain_shards}", "train.max_steps=8", "train.precision=fp32", "train.ckpt_every=100",
              *(BACKENDS[backend] if backend != "zero3" else zero3), *moe, *muon]
    run_training(*common, f"out_dir={tmp_path / 'straight'}", nproc=2)
    out = tmp_path / "resumed"
    run_training(*common, f"out_dir={out}", nproc=2, hooks="stop@3", expect=STOPPED)
    assert (out / "checkpoints" / "latest").read_text() == "step-3\n" and state(out, 3)["world_size"] == 2
    one = run_training(*common, f"out_dir={out}", "train.grad_accum=2", hooks="stop@6", check=False)
    assert one.returncode == STOPPED, one.stderr[-2000:]
    assert ("resuming at step 3: 4 x 1 x 2 processes → 4 x 2 x 1 (micro-batch x accumulation x processes), the same "
            "global batch of 8") in one.stdout
    assert state(out, 6)["world_size"] == 1 and state(out, 6)["consumed_samples"] == 48
    run_training(*common, f"out_dir={out}", nproc=2, hooks="stop@7", check=False)
    assert (out / "checkpoints" / "latest").read_text() == "step-7\n"
    last = run_training(*common, f"out_dir={out}", nproc=2)  # on as many processes as the last segment
    assert "converting" not in last.stdout and "resuming at step 7" not in last.stdout
    if backend in ("zero2", "zero3"):
        universal = out / "checkpoints" / "step-6.universal"  # cached beside its checkpoint (step-3's was pruned)
        assert (universal / "checksums.json").is_file() and not (out / "checkpoints" / "latest_universal").exists()
        assert not os.path.exists(out / "checkpoints" / "step-7.universal")
    straight, resumed = losses(tmp_path / "straight"), losses(out)
    assert sorted(resumed) == list(range(1, 9))
    if moe:
        assert losses(out, "moe_aux")[8] == pytest.approx(losses(tmp_path / "straight", "moe_aux")[8], rel=1e-4)
    for step, value in straight.items():
        assert resumed[step] == pytest.approx(value, rel=1e-5 if backend in ("ddp", "fsdp2") else 1e-4), step


@pytest.mark.slow
def test_a_changed_global_batch_continues_with_the_next_unread_sample(tokenizer_model, tmp_path):
    """8 samples per step, then 12 on two processes: every sample of the first epoch is read exactly once."""
    from training.data.order import SampleOrder
    from training.data.sources import ShardSource

    text = open(shakespeare_plays()[0], encoding="utf-8").read()[:12000]  # a scene or two: a short epoch
    src = write_jsonl(tmp_path / "small.jsonl", [{"text": text}])
    assert preprocess_main(["shards", "--input", src, "--tokenizer", tokenizer_model, "--out",
                            str(tmp_path / "shards")]) == 0
    source = ShardSource(str(tmp_path / "shards"), 32, 0.02, "pretrain")
    n = source.n_train
    assert 60 < n < 8 * 4 + 12 * 36, n  # the run reads past the end of the first epoch
    common = [f"data.path={tmp_path / 'shards'}", "train.max_steps=40", "train.ckpt_every=100",
              f"out_dir={tmp_path / 'run'}"]
    picks = f"picks={tmp_path / 'picks'}"
    run_training(*common, "train.grad_accum=2", hooks=f"stop@4,{picks}", expect=STOPPED)
    proc = run_training(*common, "train.micro_batch_size=6", nproc=2, hooks=picks)
    assert ("resuming at step 4 with another global batch, 8 → 12 (4 x 2 x 1 processes → 6 x 1 x 2 (micro-batch x "
            "accumulation x processes)): the data continues at position 32 of the global order") in proc.stdout
    read = []
    for rank in (0, 1):
        path = tmp_path / f"picks.rank-{rank}.jsonl"
        if path.exists():
            read += [tuple(p) for line in open(path) for p in json.loads(line)["picks"]]
    assert len(read) == 4 * 8 + 36 * 12
    order = SampleOrder([n], [1.0], seed=1337)
    expected = list(zip(*(a.tolist() for a in order(list(range(len(read))))), strict=True))
    assert sorted(read) == sorted(expected)  # positions 0 … 463 of the global order, no more, no fewer
    first_epoch = [s for _, s in expected[:n]]
    assert sorted(first_epoch) == list(range(n))


@pytest.mark.slow
def test_a_resume_refuses_what_would_change_the_run(pretrain_shards, chat_shards, sft_run, tmp_path):
    out = tmp_path / "run"
    run_training(f"data.path={pretrain_shards}", "train.max_steps=2", f"out_dir={out}")
    other = tmp_path / "other"
    shutil.copytree(pretrain_shards, other)
    refused = {
        "seed=2": "seed 1337, this run has 2",
        "data.seq_len=16": "data.seq_len 32, this run has 16",
        "data.val_fraction=0.1": "data.val_fraction 0.02, this run has 0.1",
        "model.dim=32": "model.dim 64, this run has 32",
        "dist.backend=deepspeed": "dist.backend ddp, this run has deepspeed",
        f"data.path=[{pretrain_shards},{other}]": "data.path (directories, weights or their contents)",
    }
    for override, message in refused.items():
        proc = run_training(f"data.path={pretrain_shards}", "train.max_steps=4", f"out_dir={out}", override,
                            check=False)
        assert proc.returncode == 1, (override, proc.stderr[-1000:])
        line = proc.stderr.strip()
        assert "\n" not in line and line.startswith(f"error: {out}/checkpoints/step-2 was trained with "), line
        assert message in line and f"another out_dir (not {out})" in line, line
    # the same shards in another place (a node-local copy) are the same data
    run_training(f"data.path={other}", "train.max_steps=3", f"out_dir={out}")
    assert max(losses(out)) == 3

    sft = tmp_path / "sft"
    common = [f"data.path={chat_shards['sft']}", "train.max_steps=2", f"out_dir={sft}", *CHAT]
    run_training(*common, f"init_from={sft_run}", stage="sft", config=SFT_CONFIG)
    for override, message in ((f"init_from={tmp_path / 'run'}", "init_from"), ("lora.rank=4", "lora.rank 0")):
        init = [] if override.startswith("init_from") else [f"init_from={sft_run}"]
        proc = run_training(*common, *init, override, "train.max_steps=3", stage="sft", config=SFT_CONFIG,
                            check=False)
        assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_init_from_may_name_the_starting_run_another_way_and_beta_is_part_of_a_dpo_run(tmp_path):
    from preprocess.errors import UserError
    from training.checkpoint.state import check_identity

    run = tmp_path / "sft"
    step = run / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (tmp_path / "link").symlink_to(run)
    saved = {"init_from": str(run), "dpo.beta": 0.1}
    started = {"path": str(step), "fingerprint": "0123"}
    for name in (run, step, tmp_path / "link", tmp_path / "link" / "checkpoints" / "step-3"):
        check_identity(saved, {"init_from": os.path.realpath(name), "dpo.beta": 0.1}, "CKPT", "OUT", started)
    with pytest.raises(UserError, match=r"CKPT was trained with init_from .*sft, this run has .*other"):
        check_identity(saved, {"init_from": str(tmp_path / "other"), "dpo.beta": 0.1}, "CKPT", "OUT", started)
    with pytest.raises(UserError, match=r"dpo.beta 0.1, this run has 0.5"):
        check_identity(saved, {"init_from": str(run), "dpo.beta": 0.5}, "CKPT", "OUT", started)


@pytest.mark.slow
def test_a_second_run_into_a_live_out_dir_is_refused_and_a_dead_one_never_blocks(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    common = [f"data.path={pretrain_shards}", "train.ckpt_every=1000", f"out_dir={out}"]
    first = subprocess.Popen(training_command(*common, "train.max_steps=100000"), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while f"pid {first.pid}" not in ((out / ".lock").read_text() if (out / ".lock").exists() else ""):
            assert time.time() < deadline and first.poll() is None, "the first run did not take the lock"
            time.sleep(0.1)
        second = run_training(*common, "seed=2", "train.max_steps=3", check=False)
        assert second.returncode == 1
        assert second.stderr == (f"error: {out} is in use by another training run (host {os.uname().nodename}, pid "
                                 f"{first.pid}); wait for it to end, or give this run another out_dir\n")
        assert first.poll() is None  # and the first one goes on
    finally:
        first.kill()
        first.wait()
    run_training(*common, "train.max_steps=2")  # the kernel released the dead holder's lock
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl"))]
    # val_loss at 0, the steps, val_loss and the checkpoint at the end: nothing of the killed run
    assert steps == [0, 1, 2, 2, 2]


@pytest.mark.slow
def test_a_killed_dpo_run_keeps_its_reference_after_the_sft_run_moved_on(pretrain_shards, chat_shards, sft_run,
                                                                         tmp_path):
    """The SFT run writes a newer checkpoint (and prunes the one DPO started from) while DPO is down: the
    resumed DPO run still optimises against the reference it started with."""
    sft = tmp_path / "sft"
    shutil.copytree(sft_run, sft)
    dpo_shards = private_copy(chat_shards["dpo"], tmp_path / "dpo-shards")
    common = [f"data.path={dpo_shards}", f"init_from={sft}", "train.max_steps=6", "train.ckpt_every=3", *CHAT]
    run_training(*common, f"out_dir={tmp_path / 'straight'}", stage="dpo", config=DPO_CONFIG)
    out = tmp_path / "killed"
    kill_after_first_checkpoint(start_training(*common, f"out_dir={out}", stage="dpo", config=DPO_CONFIG), out)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"
    pretrain = os.path.join(os.path.dirname(sft_run), "pretrain")
    run_training(f"data.path={chat_shards['sft']}", f"init_from={pretrain}", "train.max_steps=6",
                 "train.keep_checkpoints=1", f"out_dir={sft}", *CHAT, stage="sft", config=SFT_CONFIG)
    assert sorted(os.listdir(sft / "checkpoints")) == ["latest", "step-6"]
    run_training(*common, f"out_dir={out}", stage="dpo", config=DPO_CONFIG)
    for key in ("loss", "rewards/margins"):
        assert losses(out, key) == losses(tmp_path / "straight", key)
    assert state(out, 6)["init_from"]["path"] == str(sft / "checkpoints" / "step-3")


@pytest.mark.slow
def test_a_mistake_found_by_rank_0_alone_stops_every_rank_at_once(chat_shards, tmp_path):
    """Rank 0 alone resolves init_from (the others must not each pick a checkpoint of a run that is moving on);
    its error is every rank's, at once — not a wait for dist.timeout_s in a collective."""
    start = time.time()
    proc = run_training(f"data.path={chat_shards['sft']}", f"init_from={tmp_path / 'nowhere'}", "train.max_steps=1",
                        f"out_dir={tmp_path / 'r'}", "dist.timeout_s=300", *CHAT, nproc=2, stage="sft",
                        config=SFT_CONFIG, check=False)
    assert proc.returncode != 0 and time.time() - start < 120
    message = f"{tmp_path / 'nowhere'}: neither a run directory with checkpoints"
    assert f"error (rank 0): {message}" in proc.stderr and f"error (rank 1): {message}" in proc.stderr


def test_init_from_a_model_with_a_shorter_context_than_data_seq_len_is_a_one_line_error(chat_shards, sft_run, tmp_path):
    # model.max_seq_len of the config (256 here) is not the model's: with init_from, the shape is the checkpoint's
    proc = run_training(f"data.path={chat_shards['sft']}", f"init_from={sft_run}", "data.seq_len=100",
                        "model.max_seq_len=256",
                        "train.max_steps=1", f"out_dir={tmp_path / 'r'}", stage="sft", config=SFT_CONFIG, check=False)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: data.seq_len=100 is longer than the context of the model of init_from {sft_run} "
                           "(64 tokens); lower data.seq_len\n")


@pytest.mark.slow
def test_ranks_that_disagree_on_a_cached_reference_compute_it_together(chat_shards, sft_run, tmp_path):
    """Node-local copies of the shards: one has the precomputed reference log-probs, the other not. The ranks
    decide together (and compute), instead of one loading while the other waits in a collective."""
    for i in (0, 1):
        private_copy(chat_shards["dpo"], tmp_path / f"copy{i}")
    common = [f"init_from={sft_run}", "train.max_steps=2", "dpo.precompute_ref=true", "dist.timeout_s=60", *CHAT]
    run_training(f"data.path={tmp_path / 'copy0'}", *common, f"out_dir={tmp_path / 'one'}", "train.grad_accum=2",
                 stage="dpo", config=DPO_CONFIG)
    assert [f for f in os.listdir(tmp_path / "copy0") if f.startswith("ref_logps-")]
    assert not [f for f in os.listdir(tmp_path / "copy1") if f.startswith("ref_logps-")]
    local = str(tmp_path / "copy${oc.env:LOCAL_RANK}")  # each rank its own copy, as on two nodes
    run_training(f"data.path={local}", *common, f"out_dir={tmp_path / 'two'}", nproc=2, stage="dpo",
                 config=DPO_CONFIG)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step, value in one.items():
        assert two[step] == pytest.approx(value, rel=1e-5)


# the last commit before training/ was split into rooms (run/, parallel/, checkpoint/, ...): what every checkpoint
# written before has, in the layout it has
BEFORE_ROOMS = "af5ac9f7c8f04f28e9ddadf70d03fd7e636abafb"


@pytest.mark.slow
def test_a_checkpoint_written_before_the_rooms_resumes_exactly(pretrain_shards, tmp_path):
    """The code of that commit trains 4 steps, checkpointing at 2 and 4; today's code resumes its step 2 and trains
    steps 3 and 4 as that commit did: the checkpoint's files (model, optimizer, RNG, train state, identity,
    checksums) still mean what they meant. Within 1e-6, not bit for bit: today's loss sums the output layer's
    log-probs a chunk at a time (models/output.py), which rounds in another order than that commit's cross-entropy
    did (7e-8 apart); a file read with another meaning would be off by whole nats. (Against the old run, not a fresh
    one of today's code: today's random initialisation is drawn otherwise, models/transformer.py.)"""
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{BEFORE_ROOMS}^{{commit}}"]).returncode:
        pytest.skip(f"commit {BEFORE_ROOMS} is not in this clone (a shallow one?)")
    archive = subprocess.run(["git", "-C", REPO, "archive", BEFORE_ROOMS, "training", "preprocess", "configs"],
                             capture_output=True, check=True).stdout
    old = tmp_path / "before"
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(old, filter="data")
    common = [f"data.path={pretrain_shards}", "train.max_steps=4", "train.ckpt_every=2"]
    written = subprocess.run([sys.executable, "-m", "training.pretrain", "--config", "configs/pretrain/tiny.yaml", *FAST, *common,
                              f"out_dir={tmp_path / 'run'}"], cwd=old, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(old)})
    assert written.returncode == 0, written.stderr[-2000:]
    old_losses = losses(tmp_path / "run")
    os.remove(tmp_path / "run" / "checkpoints" / "latest")  # keep step-2 in charge, as a run killed after it would
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-2\n")
    proc = run_training(*common, f"out_dir={tmp_path / 'run'}")
    assert proc.stdout.startswith("step 3:")  # from the old step 2
    resumed = losses(tmp_path / "run")
    assert sorted(resumed) == sorted(old_losses) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(old_losses[step], rel=1e-6, abs=0), step
