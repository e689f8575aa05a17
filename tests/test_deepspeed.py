"""dist.backend=deepspeed on CPU (gloo), two processes: ZeRO 1-3 against DDP, resume, offload and bf16, DPO,
the deepspeed launcher."""

import glob
import importlib.util
import json
import os
import shutil
import sys
import time

import pytest
import torch
from conftest import (
    CHAT,
    DPO_CONFIG,
    FAST,
    GRPO_CONFIG,
    KTO_CONFIG,
    REPO,
    SFT_CONFIG,
    TINY_CONFIG,
    Forked,
    dpo_starts_at_zero_log_ratios,
    free_port,
    grpo_args,
    kill_after_first_checkpoint,
    losses,
    private_copy,
    run_command,
    run_process,
    run_training,
    start_training,
)

from preprocess.errors import UserError
from training.config import load_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (the dev extra installs it)")
STEPS = ["train.max_steps=8", "train.grad_accum=2", "train.precision=fp32"]


@pytest.fixture(scope="module")
def ddp_run(pretrain_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    run_training(f"data.path={pretrain_shards}", *STEPS, f"out_dir={out}", nproc=2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_give_the_ddp_losses_and_gradient_norms(stage, pretrain_shards, ddp_run, zero3, tmp_path):
    template = [f"dist.deepspeed_config={REPO}/configs/deepspeed/zero{stage}.json"] if stage else []
    backend = zero3 if stage == 3 else ["dist.backend=deepspeed", f"dist.zero_stage={stage}", *template]
    run_training(f"data.path={pretrain_shards}", *STEPS, *backend, f"out_dir={tmp_path}", nproc=2)
    for key in ("loss", "grad_norm"):  # the norm before clipping, as DDP reports it
        ours, ddp = losses(tmp_path, key), losses(ddp_run, key)
        assert sorted(ours) == list(range(1, 9))
        for step in ddp:
            assert ours[step] == pytest.approx(ddp[step], rel=1e-4), (key, step)
    # the checkpoint converts to the plain fp32 state dict that generate, export and init_from read
    from training.checkpoint.weights import load_weights
    from training.models.transformer import Transformer

    reference = torch.load(ddp_run / "checkpoints" / "step-8" / "model.pt", weights_only=True)
    model = Transformer(load_config(str(tmp_path / "config.yaml")).model)
    load_weights(str(tmp_path / "checkpoints" / "step-8"), model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_deepspeed_resumes_exactly_after_kill_9(pretrain_shards, tmp_path):
    common = [f"data.path={pretrain_shards}", "train.max_steps=7", "train.ckpt_every=3", "dist.backend=deepspeed",
              "dist.zero_stage=2"]
    run_training(*common, f"out_dir={tmp_path / 'straight'}", nproc=2)
    out = tmp_path / "killed"
    kill_after_first_checkpoint(start_training(*common, f"out_dir={out}", nproc=2), out)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"
    run_training(*common, f"out_dir={out}", nproc=2)
    assert losses(out) == losses(tmp_path / "straight")


@pytest.mark.slow
def test_bf16_with_optimizer_and_parameter_offload(pretrain_shards, tmp_path):
    run_training(f"data.path={pretrain_shards}", "train.max_steps=4", "train.precision=bf16", "dist.backend=deepspeed",
                 "dist.zero_stage=3", "dist.offload_optimizer=true", "dist.offload_params=true", f"out_dir={tmp_path}",
                 nproc=2)
    values = list(losses(tmp_path).values())
    assert len(values) == 4 and all(v == v and v < 9 for v in values) and values[-1] < values[0]
    proc = run_command("-m", "training.generate", "--checkpoint", tmp_path, "--prompt", "HAMLET:", "--max-new-tokens",
                       "5", "--greedy")
    assert proc.returncode == 0 and proc.stdout.startswith("HAMLET:"), proc.stderr


@pytest.mark.slow
def test_dpo_under_deepspeed_gives_the_ddp_losses(chat_shards, sft_run, tmp_path):
    common = [f"data.path={chat_shards['dpo']}", f"init_from={sft_run}", "train.max_steps=4", "train.grad_accum=2",
              "train.precision=fp32", *CHAT]
    run_training(*common, f"out_dir={tmp_path / 'ddp'}", nproc=2, stage="dpo", config=DPO_CONFIG)
    run_training(*common, f"out_dir={tmp_path / 'zero2'}", "dist.backend=deepspeed", "dist.zero_stage=2", nproc=2,
                 stage="dpo", config=DPO_CONFIG)
    for key in ("loss", "rewards/margins"):
        ddp, ds = losses(tmp_path / "ddp", key), losses(tmp_path / "zero2", key)
        for step in ddp:
            assert ds[step] == pytest.approx(ddp[step], rel=1e-4, abs=1e-6), (key, step)


@pytest.mark.slow
def test_the_deepspeed_launcher(pretrain_shards, tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "NUM_GPUS": "2", "MASTER_PORT": str(free_port()), "DEEPSPEED": launcher}
    proc = run_process([os.path.join(REPO, "launch", "deepspeed.sh"), "pretrain", TINY_CONFIG, *FAST,
                        f"data.path={pretrain_shards}", "train.max_steps=3", "dist.backend=deepspeed",
                        "dist.zero_stage=1", f"out_dir={tmp_path}"], env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_templates_never_set_what_our_config_sets(tmp_path):
    from training.data.order import BatchPlan
    from training.parallel.deepspeed import build_config

    cfg = load_config(TINY_CONFIG, ["train.micro_batch_size=3", "train.grad_accum=5", "train.grad_clip=0.5"])
    plan = BatchPlan.of(cfg.train, world=4)
    templates = sorted(glob.glob(os.path.join(REPO, "configs", "deepspeed", "*.json")))
    assert len(templates) == 3
    for path in templates:
        stage = json.load(open(path))["zero_optimization"]["stage"]
        ds = build_config(load_config(TINY_CONFIG, ["dist.backend=deepspeed", f"dist.zero_stage={stage}",
                                                    f"dist.deepspeed_config={path}", "train.micro_batch_size=3",
                                                    "train.grad_accum=5"]), plan, "bf16")
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
            (60, 3, 5)
        assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == stage
    assert build_config(cfg, plan, "fp32")["gradient_clipping"] == 0.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    with pytest.raises(UserError, match=r"'train_batch_size' is set from our config"):
        build_config(load_config(TINY_CONFIG, [f"dist.deepspeed_config={bad}", "dist.zero_stage=1"]), plan, "fp32")
    with pytest.raises(UserError, match="zero_optimization.stage=1 but dist.zero_stage=2"):
        build_config(load_config(TINY_CONFIG, [f"dist.deepspeed_config={REPO}/configs/deepspeed/zero1.json",
                                               "dist.zero_stage=2"]), plan, "fp32")
    with pytest.raises(UserError, match="dist.offload_params needs dist.zero_stage=3"):
        build_config(load_config(TINY_CONFIG, ["dist.zero_stage=2", "dist.offload_params=true"]), plan, "fp32")


@pytest.mark.slow
def test_lora_dpo_under_zero3_gives_the_ddp_losses_and_merged_weights(chat_shards, sft_run, zero3, tmp_path):
    """The hardest LoRA case for DeepSpeed: partitioned weights, frozen base, and a reference forward through the
    same partitioned model with its adapters off."""
    pytest.importorskip("peft")
    from training.checkpoint import weights as ckpt

    common = [f"data.path={chat_shards['dpo']}", f"init_from={sft_run}", "train.max_steps=3", "train.grad_accum=2",
              "train.precision=fp32", "lora.rank=4", "train.lr=3e-3", "train.warmup_steps=1", *CHAT]
    run_training(*common, f"out_dir={tmp_path / 'ddp'}", nproc=2, stage="dpo", config=DPO_CONFIG)
    run_training(*common, f"out_dir={tmp_path / 'zero3'}", *zero3, nproc=2,
                 stage="dpo", config=DPO_CONFIG)
    for key in ("loss", "grad_norm", "rewards/margins"):
        ddp, ds = losses(tmp_path / "ddp", key), losses(tmp_path / "zero3", key)
        for step in ddp:
            assert ds[step] == pytest.approx(ddp[step], rel=1e-4, abs=1e-6), (key, step)
    assert losses(tmp_path / "zero3", "rewards/margins")[3] != 0
    merged = {}
    for name in ("ddp", "zero3"):  # DeepSpeed's frozen and trainable partitions, consolidated and merged
        path = ckpt.resolve(str(tmp_path / name))
        merged[name] = ckpt.loaded_model(path)
    for key, value in merged["zero3"].state_dict().items():  # to 1e-4 of each tensor's scale: Adam turns the fp32
        # rounding of a near-zero gradient (reduced in another order) into a step of up to lr on that element
        reference = merged["ddp"].state_dict()[key]
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "sft-packed", "dpo", "orpo", "kto", "grpo"])
def test_zero3_and_fsdp2_with_the_shipped_evaluation_and_sampling_on_give_the_ddp_losses(
        stage, pretrain_shards, chat_shards, prompt_shards, sft_run, zero3, tmp_path):
    """ZeRO-3 and FSDP2 gather their sharded weights in every forward, so evaluation, the sample at every evaluation (every
    tiny config sets sample_prompt) and DPO's reference precompute must run on every rank alike. The validation
    subsets are uneven on purpose: 249 pretraining samples, and eval_samples=17 for SFT and DPO, give the two
    ranks unequal shares; DPO runs LoRA (its reference is the sharded model with adapters off) with the reference
    precomputed over 377 pairs (data.seq_len=58), 48 micro-batches on one rank and 47 on the other. sft-packed packs
    the conversations (rows of 63 positions take one or two of them) and masks attention per conversation. orpo is
    the DPO stage without any reference: every weight trains, and no reference forward runs. kto runs LoRA with its
    adapters-off reference live, and its reference point's extra forward before every step and evaluation. grpo
    samples on every rank (a rank whose completions all ended keeps feeding the sharded forwards until the last
    rank's have), runs LoRA with a KL term to the adapters-off model, and evaluates 5 prompts: 3 on one rank, 2 and
    a filler micro-batch with nothing to sample on the other; its table replaces the sample_prompt's continuation
    on every rank alike."""
    packed, orpo = stage == "sft-packed", stage == "orpo"
    stage = "sft" if packed else "dpo" if orpo else stage
    config = {"pretrain": TINY_CONFIG, "sft": SFT_CONFIG, "dpo": DPO_CONFIG, "kto": KTO_CONFIG,
              "grpo": GRPO_CONFIG}[stage]
    common = ["train.max_steps=4", "train.grad_accum=2", "train.precision=fp32", "dist.timeout_s=120"]
    keys = ("loss", "val_loss")
    if stage == "grpo":  # its validation loss is a surrogate near 0: the validation reward is what it measures
        common = [c for c in common if not c.startswith("train.grad_accum")]  # grpo.prompts_per_step=8: 2 of 2
        common = [*grpo_args(prompt_shards, sft_run, "grpo.beta=0.1", "lora.rank=4", "train.micro_batch_size=2",
                             "train.eval_samples=5", "train.eval_every=4", "train.sample_prompt=ROMEO"), *common]
        keys = ("loss", "reward", "kl", "val_reward")
    elif stage == "pretrain":
        common.append(f"data.path={pretrain_shards}")
    elif stage == "sft":
        common += [f"data.path={chat_shards['sft']}", f"init_from={sft_run}", "train.eval_samples=17", *CHAT,
                   *(["data.packing=true"] if packed else [])]
    elif orpo:
        common += [f"data.path={chat_shards['dpo']}", f"init_from={sft_run}", "train.eval_samples=17", *CHAT,
                   "dpo.loss=orpo"]
    elif stage == "kto":
        common += [f"data.path={chat_shards['kto']}", f"init_from={sft_run}", "train.eval_samples=17", *CHAT,
                   "lora.rank=4"]
    else:  # each backend computes the reference itself: a copy of the shards each, no cache left by another
        common += [f"init_from={sft_run}", "train.eval_samples=17", *CHAT, "data.seq_len=58", "lora.rank=4",
                   "dpo.precompute_ref=true"]
    sharded = {"zero3": zero3, "fsdp2": ["dist.backend=fsdp2"]}
    if stage in ("pretrain", "sft", "dpo") and not packed:  # FSDP2 here where the case adds to test_fsdp2.py's
        del sharded["fsdp2"]  # (packing, LoRA's adapters-off reference live (KTO) and GRPO): the suite's time counts
    for name, extra in (("ddp", []), *sharded.items()):
        own = [f"data.path={private_copy(chat_shards['dpo'], tmp_path / f'dpo-{name}')}"] if stage == "dpo" and \
            not orpo else []
        run_training(*common, *extra, *own, f"out_dir={tmp_path / name}", nproc=2, stage=stage, config=config)
    for name in sharded:
        for key in keys:
            ddp, ours = losses(tmp_path / "ddp", key), losses(tmp_path / name, key)
            assert sorted(ours) == sorted(ddp) and len(ddp) >= 2
            for step in ddp:
                # GRPO's loss is what is left of terms of size ~1 that cancel (advantages sum to 0 per group): its
                # last digits are the terms' rounding, so it is compared to their size, not its own
                assert ours[step] == pytest.approx(ddp[step], rel=1e-4, abs=1e-8 if stage == "grpo" else 0), \
                    (name, key, step)
        samples = losses(tmp_path / name, "sample")
        assert sorted(samples) == [0, 4] and all(len(s) > 10 for s in samples.values())


@pytest.mark.slow
def test_dpo_under_deepspeed_bf16_starts_with_zero_log_ratios(chat_shards, sft_run, tmp_path):
    """DeepSpeed bf16 casts the policy's weights to bf16: the reference must compute in that precision too, or
    the log-ratios are not 0 before the first update."""
    cache = dpo_starts_at_zero_log_ratios(["dist.backend=deepspeed", "dist.zero_stage=2"], chat_shards, sft_run,
                                          tmp_path)
    assert cache.endswith("-bf16.npy")  # the cache of a bf16 run is its own: its name says the precision


@pytest.mark.slow
def test_sft_and_dpo_from_a_deepspeed_run_on_two_processes_start_cleanly(chat_shards, pretrain_shards, tmp_path):
    """The first use of a DeepSpeed checkpoint converts it to model.pt; every rank used to write the same
    model.pt.tmp at once. Two converters released at the same moment, three times, must each leave one whole
    file; then SFT and DPO on two processes start from a never-converted copy, twice (the race is at the start,
    so one step each)."""
    run_training(f"data.path={pretrain_shards}", "train.max_steps=2", "dist.backend=deepspeed", "dist.zero_stage=2",
                 f"out_dir={tmp_path / 'pre'}", nproc=2)
    sft_start = shutil.copytree(tmp_path / "pre", tmp_path / "pre-for-sft")  # keep pre unconverted
    run_training(f"data.path={chat_shards['sft']}", f"init_from={sft_start}", "train.max_steps=2",
                 "dist.backend=deepspeed", "dist.zero_stage=2", f"out_dir={tmp_path / 'sft'}", *CHAT, nproc=2,
                 stage="sft", config=SFT_CONFIG)
    assert not glob.glob(str(tmp_path / "[ps][rf][et]" / "checkpoints" / "step-2" / "model.pt"))  # pre/, sft/
    # two jobs converting the same checkpoint at the same moment both get a whole file; each says when its
    # imports (DeepSpeed's converter too) are done, so the release waits for both however loaded the machine is
    convert = ("import os, sys, time\nimport torch\nfrom training.checkpoint.weights import model_file\n"
               "from training.parallel.deepspeed import prepare_environment\n"
               "prepare_environment(torch.device('cpu'))\n"
               "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint\n"
               "open(sys.argv[3], 'w').close()\n"
               "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\nmodel_file(sys.argv[1])\n")
    (tmp_path / "convert.py").write_text(convert)  # a script: forked (conftest.Forked), two processes of their own
    for i in range(3):
        step = shutil.copytree(tmp_path / "pre" / "checkpoints" / "step-2", tmp_path / f"step-2-copy{i}")
        go, ready = tmp_path / f"go{i}", [tmp_path / f"ready{i}-{j}" for j in range(2)]
        jobs = [Forked([tmp_path / "convert.py", step, go, r]) for r in ready]
        deadline = time.time() + 300
        while not all(r.exists() for r in ready) and time.time() < deadline:
            assert all(job.poll() is None for job in jobs), "a converter ended before the release"
            time.sleep(0.01)
        go.touch()
        assert [job.wait(timeout=300) for job in jobs] == [0, 0], [job.output() for job in jobs]
        assert sorted(os.listdir(step)) == sorted([*os.listdir(tmp_path / "pre" / "checkpoints" / "step-2"),
                                                   "model.pt"])
        assert torch.load(step / "model.pt", weights_only=True).keys()
    for i in range(2):
        for stage, config, source in (("sft", SFT_CONFIG, "pre"), ("dpo", DPO_CONFIG, "sft")):
            start = shutil.copytree(tmp_path / source, tmp_path / f"{source}-copy{i}")
            run_training(f"data.path={chat_shards[stage]}", f"init_from={start}", "train.max_steps=1",
                         f"out_dir={tmp_path / f'{stage}{i}'}", *CHAT, nproc=2, stage=stage, config=config)
            assert os.path.isfile(start / "checkpoints" / "step-2" / "model.pt")
            assert not glob.glob(str(start / "checkpoints" / "step-2" / "model.pt.tmp*"))


def test_each_rank_knows_the_deepspeed_files_it_wrote(tmp_path):
    """Each rank fsyncs what it wrote (an fsync on another machine does not flush this one's cache)."""
    from training.parallel.deepspeed import files_written_by

    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_10_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "rng-rank0.pt", "rng-rank1.pt", "zero_to_fp32.py"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    mine = {r: sorted(os.path.basename(p) for p in files_written_by(str(tmp_path), r)) for r in (0, 1, 10)}
    assert mine[0] == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_to_fp32.py"]
    assert mine[1] == ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                       "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert mine[10] == ["zero_pp_rank_10_mp_rank_00_optim_states.pt"]
