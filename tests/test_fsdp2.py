"""dist.backend=fsdp2 (FSDP2, DCP checkpoints) against DDP on two gloo processes; its resume on another number of
processes is in test_resume.py with the other backends'."""

import json
import os
import subprocess

import pytest
import torch
from conftest import (
    CHAT,
    DPO_CONFIG,
    REPO,
    SFT_CONFIG,
    dpo_starts_at_zero_log_ratios,
    losses,
    private_copy,
    python,
    run_command,
    run_training,
    val_losses,
)

from training.checkpoint.weights import load_weights
from training.config import load_config
from training.models.transformer import Transformer

STEPS = ["train.max_steps=6", "train.grad_accum=2", "train.precision=fp32", "train.eval_every=3",
         "train.optimizer=muon", "train.ckpt_every=2"]


@pytest.mark.slow
def test_fsdp2_with_muon_gives_the_ddp_losses_norms_and_weights_and_resumes_exactly_after_kill_9_mid_saves(
        pretrain_shards, chat_shards, zero3, tmp_path):
    """With Muon (each sharded matrix gathered whole, orthogonalised on every rank alike, its shard kept) the same
    losses, gradient norms (before clipping) and validation losses as DDP's Muon within 1e-5, with the shipped
    evaluation and its sample on (sharded forwards on every rank in lockstep) and train.compile's blocks (traced by
    aot_eager: inductor's code generation takes minutes on a CPU), which sampling leaves compiled; the model was built on the meta
    device and each rank drew its shards of DDP's initial weights. The checkpoint is a DCP directory, each rank's
    shard file and rank 0's metadata checksummed, whose consolidated weights are DDP's and which training.generate
    reads. Then every rank of the same run dies (kill -9) after writing its shards of a checkpoint, before it is
    complete: step 4's written in the background (train.async_checkpoint: while steps 5 and 6 train), then, resumed
    from step 2 (itself written while steps 3 and 4 trained), step 6's in the loop's thread; resumed from step 4,
    the run ends where the uninterrupted one did with the same curve. Last, the
    checkpoint starts SFT under DDP and ZeRO-3 (init_from) from the model DDP's own checkpoint starts DDP's SFT
    from: the same validation loss before the first step (the starting logits) and the same first loss."""
    runs, compiled = {}, tmp_path / "compiled"
    for backend, extra in (("ddp", []), ("fsdp2", ["train.compile=true"])):
        runs[backend] = tmp_path / backend
        run_training(f"data.path={pretrain_shards}", *STEPS, f"dist.backend={backend}", f"out_dir={runs[backend]}",
                     *extra, nproc=2, hooks=f"compiled={compiled}" if extra else None)
    for rank in (0, 1):  # each block's training forwards compiled after every sample (2 blocks x 2 micro-steps at
        calls = json.loads(compiled.with_suffix(f".rank-{rank}.json").read_text())  # least), evaluation's too
        training = {calls.get(str(step), 0) for step in (1, 2, 4, 5)}
        assert len(training) == 1 and min(training) >= 4 and calls["3"] > min(training) < calls["6"], calls
    for key in ("loss", "grad_norm"):
        ours, ddp = losses(runs["fsdp2"], key), losses(runs["ddp"], key)
        assert sorted(ours) == list(range(1, 7))
        for step, value in ddp.items():
            assert ours[step] == pytest.approx(value, rel=1e-5), (key, step)
    assert val_losses(runs["fsdp2"]) == pytest.approx(val_losses(runs["ddp"]), rel=1e-5)
    step = runs["fsdp2"] / "checkpoints" / "step-6"
    assert set(json.loads((step / "checksums.json").read_text())) >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not (step / "model.pt").exists()
    reference = torch.load(runs["ddp"] / "checkpoints" / "step-6" / "model.pt", weights_only=True)
    model = Transformer(load_config(str(runs["fsdp2"] / "config.yaml")).model)
    load_weights(str(step), model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)
    proc = run_command("-m", "training.generate", "--checkpoint", runs["fsdp2"], "--prompt", "HAMLET:",
                       "--max-new-tokens", "8", "--greedy")
    assert proc.returncode == 0 and proc.stdout.startswith("HAMLET:"), proc.stderr

    out, common = tmp_path / "killed", [f"data.path={pretrain_shards}", *STEPS, "dist.backend=fsdp2"]
    ckpts, background = out / "checkpoints", "train.async_checkpoint=true"
    proc = run_training(*common, background, f"out_dir={out}", nproc=2, hooks="die-in-save@4", check=False)
    assert proc.returncode != 0 and (ckpts / "latest").read_text() == "step-2\n"  # written while steps 3, 4 trained
    assert (ckpts / "step-4.tmp").is_dir()  # what the ranks' writing threads wrote before they died
    proc = run_training(*common, f"out_dir={out}", nproc=2, hooks="die-in-save@6", check=False)  # in the loop's thread
    assert proc.stdout.startswith("step 3:") and proc.returncode != 0  # from step 2's checkpoint
    assert (ckpts / "latest").read_text() == "step-4\n" and (ckpts / "step-6.tmp").is_dir()
    proc = run_training(*common, background, f"out_dir={out}", nproc=2)
    assert proc.stdout.startswith("step 5:")
    assert losses(out) == losses(runs["fsdp2"]) and val_losses(out) == val_losses(runs["fsdp2"])
    assert (ckpts / "latest").read_text() == "step-6\n" and not list(ckpts.glob("*.tmp"))
    assert sorted(losses(out, "time/checkpoint")) == [2, 4, 6]  # each by the run that wrote it

    sft = [f"data.path={chat_shards['sft']}", "train.max_steps=1", "train.precision=fp32", *CHAT]
    one = ["train.grad_accum=2"]  # one process, the global batch of two
    starts = {"ddp from ddp": (runs["ddp"], one, 1), "ddp from fsdp2": (runs["fsdp2"], one, 1),
              "zero3 from fsdp2": (runs["fsdp2"], zero3, 2)}
    for name, (start, backend, nproc) in starts.items():
        run_training(*sft, f"init_from={start}", *backend, f"out_dir={tmp_path / name}", nproc=nproc, stage="sft",
                     config=SFT_CONFIG)
    for name in ("ddp from fsdp2", "zero3 from fsdp2"):
        for key in ("val_loss", "loss"):
            ours, theirs = losses(tmp_path / name, key), losses(tmp_path / "ddp from ddp", key)
            assert sorted(ours) == sorted(theirs) and ours == pytest.approx(theirs, rel=1e-5), (name, key)


@pytest.mark.slow
def test_dpo_with_a_sharded_reference_live_and_precomputed_gives_the_ddp_losses(chat_shards, sft_run, tmp_path):
    """Every weight trains (no LoRA), so the pinned starting weights are a model of their own, sharded as the policy
    is and gathered block by block in every reference forward; computed live at every step and once before the
    run (dpo.precompute_ref), both give DDP's live losses and reward margins."""
    common = [f"data.path={private_copy(chat_shards['dpo'], tmp_path / 'dpo-shards')}", f"init_from={sft_run}",
              "train.max_steps=3", "train.grad_accum=2", "train.precision=fp32", "train.eval_samples=17", *CHAT]
    runs = {"ddp": [], "fsdp2": ["dist.backend=fsdp2"],
            "fsdp2-precomputed": ["dist.backend=fsdp2", "dpo.precompute_ref=true"]}
    for name, extra in runs.items():
        run_training(*common, *extra, f"out_dir={tmp_path / name}", nproc=2, stage="dpo", config=DPO_CONFIG)
    assert losses(tmp_path / "ddp", "rewards/margins")[3] != 0
    for name in ("fsdp2", "fsdp2-precomputed"):
        for key in ("loss", "rewards/margins", "val_loss"):
            ddp, ours = losses(tmp_path / "ddp", key), losses(tmp_path / name, key)
            assert sorted(ours) == sorted(ddp) and ddp
            for step, value in ddp.items():
                assert ours[step] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key, step)


@pytest.mark.slow
def test_bf16_weights_gathered_from_fp32_shards_track_ddp_autocast_and_dpo_starts_at_zero_log_ratios(
        pretrain_shards, chat_shards, sft_run, tmp_path):
    """train.precision=bf16: FSDP2 computes with bf16 weights gathered from its fp32 shards (the rotary tables fp32),
    DDP with autocast over fp32 weights; their losses stay within 1e-3 of each other. DPO's reference is sharded
    under the same policy, live or precomputed (its cache named for this precision, apart from autocast's): the
    log-ratios are 0 before the first update."""
    common = [f"data.path={pretrain_shards}", "train.max_steps=4", "train.grad_accum=2", "train.precision=bf16"]
    for backend in ("ddp", "fsdp2"):
        run_training(*common, f"dist.backend={backend}", f"out_dir={tmp_path / backend}", nproc=2)
    assert losses(tmp_path / "fsdp2") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-3)
    assert dpo_starts_at_zero_log_ratios(["dist.backend=fsdp2"], chat_shards, sft_run, tmp_path).endswith(
        "-bf16-mixed.npy")


UNEVEN_FILL = """
import dataclasses
import torch
from training.checkpoint.rng import seed_rng
from training.checkpoint.weights import starting_model
from training.config import Config, LoraConfig
from training.data.order import BatchPlan
from training.models import lora
from training.models.transformer import ModelConfig, MoEConfig, Transformer
from training.parallel import env as D
from training.parallel.fsdp2 import FSDP2

cfg = Config()
cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, backend="fsdp2"))
env = D.init("fsdp2", "cpu", 120, group_always=True)
backend = FSDP2(cfg, env, BatchPlan.of(cfg.train, env.world_size, env.rank), "fp32")
adapters = LoraConfig(rank=2, targets=["wq", "wv"])
for tied in (True, False):
    shape = ModelConfig(vocab_size=67, dim=24, n_layers=2, n_heads=2, ffn_hidden=40, max_seq_len=16, tie_embeddings=tied,
                        moe=MoEConfig(experts=4, top_k=2, every=2, expert_hidden=8))
    model = starting_model(None, shape, backend, 7, lambda m: lora.apply(m, adapters))
    seed_rng(7)
    whole = Transformer(shape)
    lora.apply(whole, adapters)
    lora.init_adapters(whole, 7)
    expected = dict(whole.named_parameters())
    assert list(dict(model.named_parameters())) == list(expected)
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), expected[name]), name
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    rows = {name: p.to_local().shape[0] for name, p in model.named_parameters()}
    held = (rows["tok_embeddings.weight"], rows["layers.1.feed_forward.w1"])
    assert held == [(23, 2), (23, 2), (21, 0)][env.rank], held  # torch.chunk's split, the last rank no expert
if env.rank == 0:
    print("filled")
"""


def test_three_ranks_fill_uneven_and_empty_shards_with_the_values_of_the_model_built_whole(tmp_path):
    """Three ranks split a 67-token vocabulary 23/23/21 and 4 stacked experts 2/2/0 (one rank holds none): each
    fills its shards of the random initialisation (LoRA's adapters too, tied head or not) with exactly the values
    of the model built whole from the same seed, and a tied head stays tied."""
    script = tmp_path / "fill.py"
    script.write_text(UNEVEN_FILL)
    proc = subprocess.run([*python(3), str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0 and "filled" in proc.stdout, proc.stderr[-3000:]
