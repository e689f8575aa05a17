"""GRPO: its losses and advantages against TRL's own GRPOTrainer code, the prompts shards, the rewards' contract,
and runs: the same samples, rewards and losses on 1 process with accumulation and on 2 processes, an exact
resume after kill -9, ZeRO-3 (tests/test_deepspeed.py), a reward that rises on an arithmetic task."""

import importlib.util
import json
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    GRPO_CONFIG,
    REPO,
    REWARDS,
    grpo_args,
    kill_after_first_checkpoint,
    run_training,
    start_training,
    write_jsonl,
)

from preprocess.__main__ import main as preprocess_main
from preprocess.errors import UserError
from training.stages.grpo import Reward
from training.stages.losses import GRPO_LOSSES, group_advantages, grpo_loss, grpo_units

ROWS, WIDTH = 6, 9
TRL = "TRL is the reference for the loss and advantage formulas (pip install trl)"  # those tests alone skip


def tensors(seed: int):
    """Per-token log-probs of the policy, of the sampling policy (off by up to ±0.4, so that ratios leave the clip
    range both ways) and of a reference; advantages of both signs; completions of 1 to WIDTH tokens."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(ROWS, WIDTH, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(ROWS, WIDTH, generator=g, dtype=torch.float64) - 0.5) * 0.8
    ref = logps + torch.randn(ROWS, WIDTH, generator=g, dtype=torch.float64) * 0.3
    advantages = torch.randn(ROWS, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, WIDTH + 1, (ROWS,), generator=g)
    mask = (torch.arange(WIDTH) < lengths[:, None]).long()
    return logps, old, ref, advantages, mask


def trl_loss(loss_type: str, logps, old, ref, advantages, mask, *, beta: float, epsilon: float,
             epsilon_high: float, max_completion_length: int):
    """GRPOTrainer._compute_loss on a stand-in `self`, one process, no accumulation: (loss, its metrics)."""
    from trl import GRPOTrainer

    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction: x)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, use_vllm=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=accelerator,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(ROWS, 1, dtype=torch.long), "prompt_mask": torch.ones(ROWS, 1),
              "completion_ids": torch.zeros(ROWS, WIDTH, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
              **({"ref_per_token_logps": ref} if beta else {})}
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", sorted(GRPO_LOSSES))
@pytest.mark.parametrize("beta, epsilon, epsilon_high", [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28), (0.5, 0.1, 0.3)])
def test_each_loss_and_option_equals_trls_grpo_trainer(loss_type, beta, epsilon, epsilon_high):
    pytest.importorskip("trl", reason=TRL)
    for seed in range(3):
        logps, old, ref, advantages, mask = tensors(seed)
        ours, metrics = grpo_loss(loss_type, logps, old, advantages, mask, epsilon=epsilon,
                                  epsilon_high=epsilon_high, beta=beta, ref_logps=ref)
        units = grpo_units(loss_type, mask.sum(dim=-1), WIDTH)
        theirs, trl_metrics = trl_loss(loss_type, logps, old, ref, advantages, mask, beta=beta, epsilon=epsilon,
                                       epsilon_high=epsilon_high, max_completion_length=WIDTH)
        assert float(ours / units) == pytest.approx(theirs, rel=1e-9, abs=1e-12)
        for name in ("low", "high", "region"):  # TRL divides these in float32
            total, count = metrics[f"clip_ratio/{name}"].tolist()
            assert total / count == pytest.approx(trl_metrics[f"clip_ratio/{name}_mean"], rel=1e-6, abs=1e-12)
        assert metrics["clip_ratio/region"][0] > 0  # the tensors do clip, both ways between the seeds
        if beta:
            total, count = metrics["kl"].tolist()
            assert total / count == pytest.approx(trl_metrics["kl"], rel=1e-9)


def test_the_gradient_at_ratio_one_is_the_advantage_weighted_policy_gradient():
    """One pass per sample (old = the policy, detached): d loss / d logp of a token is −A / the loss's normaliser
    (dapo: every token of the batch alike)."""
    logps, _, _, advantages, mask = tensors(5)
    logps.requires_grad_(True)
    loss, _ = grpo_loss("dapo", logps, logps.detach(), advantages, mask, epsilon=0.2, epsilon_high=0.2)
    loss.backward()
    torch.testing.assert_close(logps.grad, -advantages[:, None].expand_as(mask) * mask)


def test_advantages_equal_trls_formula_with_its_nanstd():
    pytest.importorskip("trl", reason=TRL)
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5 * 4, generator=g, dtype=torch.float64)
    rewards[4:8] = 0.5           # a group with zero spread
    rewards[[9, 13]] = torch.nan  # completions no reward scored
    rewards[16:19] = torch.nan    # a group with one scored completion
    grouped = rewards.view(-1, 4)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(4)
    group_std = torch.stack([nanstd(row) for row in grouped]).repeat_interleave(4)
    for scale, expected in (("group", (rewards - mean) / (group_std + 1e-4)),
                            ("batch", (rewards - mean) / (nanstd(rewards) + 1e-4)),
                            ("none", rewards - mean)):
        ours, zero = group_advantages(rewards, 4, scale, float(nanstd(rewards)))
        # nanstd's Bessel factor count / (count - 1) is a float32 division: 1.5e-8 apart from float64's
        torch.testing.assert_close(ours, torch.nan_to_num(expected, nan=0.0), rtol=1e-7, atol=1e-12)
        assert zero.tolist() == [False, True, False, False, True]


# ------------------------------------------------------------------------------------------------ rewards

def test_a_reward_gets_the_keywords_it_names_and_bad_values_are_one_line():
    keywords = {"prompt": "17+25=", "answer": "42", "completion_tokens": 3, "stopped": True}
    assert Reward(f"{REWARDS}:exact_answer", 1.0)("42", keywords, "p.jsonl:3") == 1.0
    assert Reward(f"{REWARDS}:exact_answer", 1.0)("41", keywords, "p.jsonl:3") == 0.0
    assert Reward(f"{REWARDS}:vowel_share", 1.0)("aab", keywords, "p.jsonl:3") == pytest.approx(2 / 3)
    shipped = Reward(os.path.join(REPO, "recipes", "arithmetic.py") + ":exact_answer", 1.0)  # the recipe's
    assert [shipped(t, keywords, "p.jsonl:3") for t in ("42", " 42.", "42, done", "421", "42.5", "4")] == \
        [1, 1, 1, 0, 0, 0]
    assert Reward(f"{REWARDS}:no_reward", 1.0)("x", keywords, "p.jsonl:3") is None
    for name, said in (("raises", "raised ZeroDivisionError"), ("not_a_number", "returned 'many'"),
                       ("infinite", "returned inf")):
        with pytest.raises(UserError) as e:
            Reward(f"{REWARDS}:{name}", 1.0)("x", keywords, "p.jsonl:3")
        assert str(e.value).startswith(f"p.jsonl:3: reward {REWARDS}:{name}") and said in str(e.value)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- prompts shards

def test_prompts_shards_keep_each_record_and_refuse_what_is_no_prompt(tmp_path, tokenizer_model):
    from training.data.sources import open_sources

    records = [{"prompt": "17+25=", "answer": "42"},
               {"prompt": [{"role": "user", "content": "Write a line spoken by ROMEO."}], "title": "R"},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
               {"text": "no prompt"},
               {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
               {"prompt": "x" * 400}]
    src = write_jsonl(tmp_path / "prompts.jsonl", records)
    out = str(tmp_path / "shards")
    assert preprocess_main(["shards", "--kind", "prompts", "--input", src, "--tokenizer", tokenizer_model,
                            "--out", out, "--max-len", "64"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["skipped"] == {"bad_messages": 1, "missing_key": 1, "too_long": 1}
    assert preprocess_main(["verify", out]) == 0
    source = open_sources([out], 64, 0.0, "prompts", 1)[0]
    kept = [source.record(j) for j in range(source.n_train)]
    assert [k["record"] for k in kept] == [records[0], records[1], {"prompt": records[2]["messages"]}]
    assert [k["where"] for k in kept] == [f"{src}:1", f"{src}:2", f"{src}:3"]
    from preprocess.tokenizer import TextTokenizer

    sp = TextTokenizer(tokenizer_model)
    plain, chat = source.example(0)[0][0], source.example(1)[0][0]
    assert plain[:-1].tolist() == sp.encode("17+25=") and plain[-1] == sp.eos_id
    assert sp.decode(chat[:-1].tolist()).endswith("ROMEO.") and sp.is_control(int(chat[-2]))


# ------------------------------------------------------------------------------------------------------ runs

def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_one_process_with_accumulation_two_processes_and_a_resume_after_kill_9_give_the_same_run(
        prompt_shards, sft_run, tmp_path):
    """The same global batch of 4 prompts as 1 process x 2 micro-steps and as 2 processes x 1: the same samples
    (completion lengths), rewards, advantages (losses) and validation rewards, step by step; a run killed after
    its first checkpoint and resumed continues with the same samples and losses; packing the completions into
    rows changes nothing but the padding. Two optimizer steps on each step's samples (grpo.iterations=2): the
    second compares with the log-probs recorded when sampling, and clips."""
    # the global batch as grpo.prompts_per_step: 2 micro-steps on 1 process, 1 on 2 (the accumulation follows)
    common = ["train.micro_batch_size=2", "grpo.prompts_per_step=4", "grpo.iterations=2", "grpo.beta=0.05"]
    run_training(*grpo_args(prompt_shards, sft_run, *common, f"out_dir={tmp_path / 'one'}"), stage="grpo",
                 config=GRPO_CONFIG)  # β: the pinned reference
    run_training(*grpo_args(prompt_shards, sft_run, *common, f"out_dir={tmp_path / 'two'}"), nproc=2, stage="grpo",
                 config=GRPO_CONFIG)
    killed = tmp_path / "killed"
    args = grpo_args(prompt_shards, sft_run, *common, f"out_dir={killed}")
    run_training(*args[:-1], "data.packing=true", f"out_dir={tmp_path / 'packed'}", stage="grpo", config=GRPO_CONFIG)
    kill_after_first_checkpoint(start_training(*args, stage="grpo", config=GRPO_CONFIG), killed)
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-2"
    run_training(*args, stage="grpo", config=GRPO_CONFIG)

    one = records(tmp_path / "one")
    train = [r for r in one if "loss" in r and "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert any(r["loss"] != 0 for r in train) and all(0 < r["reward"] < 1 for r in train)
    assert all(r["frac_reward_zero_std"] < 1 and r["completions/max_length"] <= 12 for r in train)
    assert [r["reward"] for r in train][::2] == [r["reward"] for r in train][1::2]  # each sample trained on twice
    # the first pass on each sample: ratios of 1 (to the recorded log-probs' rounding); the second clips some
    assert all(r["clip_ratio/region"] == 0 for r in train[::2]) and any(r["clip_ratio/region"] for r in train[1::2])
    evaluations = [r for r in one if "val_reward" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    assert evaluations[0]["sample"].startswith("| prompt | best | reward | worst | reward |")
    assert all(r["kl"] >= 0 for r in train) and train[-1]["kl"] > 0
    keys = ("loss", "kl", "reward", "reward_std", "rewards/vowel_share/mean", "completions/mean_length",
            "completions/truncated", "frac_reward_zero_std", "clip_ratio/region", "val_reward", "grad_norm")
    packed = [r for r in records(tmp_path / "packed") if "padding_share" in r]
    assert all(p["padding_share"] < r["padding_share"] for p, r in zip(packed, train, strict=True))
    for other in ("two", "killed", "packed"):
        theirs = records(tmp_path / other)
        for key in keys:
            mine = {r["step"]: r[key] for r in one if key in r}
            assert mine.keys() == {r["step"]: r[key] for r in theirs if key in r}.keys(), (other, key)
            for step, value in {r["step"]: r[key] for r in theirs if key in r}.items():
                assert value == pytest.approx(mine[step], rel=1e-5, abs=1e-6), (other, key, step)


def test_in_bf16_the_first_pass_on_each_sample_has_ratios_of_one(prompt_shards, sft_run, tmp_path):
    """The later passes compare with the policy's log-probs computed as its training forward computes them (the
    sampler's KV-cache arithmetic rounds otherwise in bf16): the first pass's loss is the one-pass loss
    (ratios of exactly 1) and clips nothing; the second clips."""
    common = grpo_args(prompt_shards, sft_run, "train.precision=bf16", "train.lr=3e-3")
    run_training(*common, "grpo.iterations=2", f"out_dir={tmp_path / 'two'}", stage="grpo", config=GRPO_CONFIG)
    run_training(*common, "train.max_steps=1", f"out_dir={tmp_path / 'one'}", stage="grpo", config=GRPO_CONFIG)
    train = [r for r in records(tmp_path / "two") if "loss" in r]
    one_pass = [r for r in records(tmp_path / "one") if "loss" in r]
    assert train[0]["loss"] == pytest.approx(one_pass[0]["loss"], rel=1e-6, abs=1e-9)
    assert [r["clip_ratio/region"] for r in train[::2]] == [0, 0] and any(r["clip_ratio/region"] for r in train[1::2])


def test_a_bad_reward_stops_every_rank_with_one_line_and_equal_rewards_skip_steps(prompt_shards, sft_run,
                                                                                    tmp_path):
    """A reward that fails on one rank only (at the first evaluation): the other rank stops too, at once; one that
    returns no number names itself, the prompt's line and the value; rewards all equal leave nothing to learn:
    each such step is skipped, and grpo.max_empty_steps of them in a row stop the run."""
    proc = run_training(*grpo_args(prompt_shards, sft_run, f"grpo.rewards=[{REWARDS}:fails_on_rank_1]",
                                   f"out_dir={tmp_path / 'one-rank'}"), nproc=2, stage="grpo", config=GRPO_CONFIG,
                        expect=1)
    assert "reward" in proc.stderr and "raised RuntimeError: no scorer on this node" in proc.stderr
    assert "a reward failed on another rank" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_training(*grpo_args(prompt_shards, sft_run, f"grpo.rewards=[{REWARDS}:not_a_number]",
                                   f"out_dir={tmp_path / 'bad'}"),  # fails at the first evaluation's rewards
                        nproc=2, stage="grpo", config=GRPO_CONFIG, expect=1)
    line = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    assert line and "prompts.jsonl:" in line[0] and f"reward {REWARDS}:not_a_number" in line[0] \
        and "returned 'many'" in line[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    proc = run_training(*grpo_args(prompt_shards, sft_run, f"grpo.rewards=[{REWARDS}:constant]",
                                   "grpo.max_empty_steps=2", f"out_dir={tmp_path / 'flat'}"),
                        stage="grpo", config=GRPO_CONFIG, expect=1)
    assert proc.stderr.count("no completion had an advantage: 8 of 8 groups had equal rewards: update skipped") == 2
    assert "nothing to learn from for 2 steps in a row (grpo.max_empty_steps=2; the last: no completion had an " \
           "advantage: 8 of 8 groups had equal rewards); the weights are those of step 0" in proc.stderr


def test_weighted_rewards_by_module_or_file_skipped_bad_values_batch_scaling_and_truncation_masking(
        prompt_shards, sft_run, tmp_path):
    """The options the other runs leave at their defaults, in one run: rewards named as module:function (a builtin)
    and file.py:function with weights, the keywords a reward names, grpo.skip_bad_rewards (a reward without a number
    for some completions: counted, the run goes on), scale_rewards=batch, and grpo.mask_truncated with completions
    of 3 tokens, nearly all cut off: a step whose completions all were is skipped, saying so."""
    proc = run_training(*grpo_args(prompt_shards, sft_run, "train.max_steps=2", "grpo.max_new_tokens=3",
                                   f"grpo.rewards=[{REWARDS}:vowel_share, builtins:len, {REWARDS}:bad_when_odd]",
                                   "grpo.reward_weights=[1.0, 0.01, 0.5]", "grpo.skip_bad_rewards=true",
                                   "grpo.scale_rewards=batch", "grpo.mask_truncated=true", "grpo.max_empty_steps=3",
                                   f"out_dir={tmp_path / 'options'}"), stage="grpo", config=GRPO_CONFIG)
    assert proc.stderr.count("grpo.skip_bad_rewards: counted as no reward") >= 1
    train = [r for r in records(tmp_path / "options") if "reward" in r and "val_reward" not in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["rewards/bad"] > 0 and r["rewards/bad_when_odd/mean"] == 0  # none gave 1e6: keywords as named
        # the total is the weighted sum (bad_when_odd adds 0 where it scored); len counts characters
        assert r["reward"] == pytest.approx(r["rewards/vowel_share/mean"] + 0.01 * r["rewards/len/mean"], rel=1e-6)
        if r["completions/truncated"] == 1:  # every completion cut off: nothing left to learn from
            assert r.get("skipped") and "were cut off (grpo.mask_truncated)" in proc.stderr
    assert any(r["completions/truncated"] == 1 for r in train)  # (both steps, at this seed)


def test_sampling_in_lockstep_never_runs_past_the_context():
    """Another rank's completions going on for max_new_tokens steps keep this rank's forwards going: a prompt as
    long as the room allows (data.seq_len - max_new_tokens + 1 tokens, data.seq_len = the model's context) still
    never takes a forward past the context."""
    from training.models.decoding import sample_batch
    from training.models.transformer import ModelConfig, Transformer

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, max_seq_len=24)).eval()
    new = 6
    prompt = list(range(1, 24 - new + 2))
    calls = []

    def another_rank_goes_on(live: bool, failed: bool) -> tuple[bool, bool]:
        calls.append(live)
        return len(calls) < new, False  # the other rank's rows end at max_new_tokens
    ids, stopped = sample_batch(model, [prompt, prompt[:3]], [49, 49], [1, 2], new, lockstep=another_rank_goes_on)
    assert len(calls) == new and all(len(x) <= new for x in ids)
    alone, _ = sample_batch(model, [prompt, prompt[:3]], [49, 49], [1, 2], new)
    assert alone == ids  # the extra forwards change nothing of this rank's rows


def test_a_rank_whose_logits_are_not_finite_stops_every_rank_at_the_same_step():
    """NaN logits on one rank (weights broken there only) are told through the lockstep reduction: that rank stops
    drawing and reports, the others hear it at the same step, and each raises one line — none waits for a rank
    that has stopped."""
    from training.models.decoding import NonFiniteLogits, sample_batch
    from training.models.transformer import ModelConfig, Transformer

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, max_seq_len=24)).eval()
    reports = []

    def together(live: bool, failed: bool) -> tuple[bool, bool]:  # this rank and one that fails at its 3rd step
        reports.append((live, failed))
        return True, failed or len(reports) == 3
    with pytest.raises(NonFiniteLogits, match="another process"):
        sample_batch(model, [[1, 2, 3]], [None], [1], 8, lockstep=together)
    assert len(reports) == 3 and not any(failed for _, failed in reports)
    with torch.no_grad():
        model.output.weight[7] = float("nan")
    reports.clear()

    def alone_in_trouble(live: bool, failed: bool) -> tuple[bool, bool]:  # the other rank is fine
        reports.append((live, failed))
        return True, failed
    with pytest.raises(NonFiniteLogits, match="logits hold NaN"):
        sample_batch(model, [[1, 2, 3]], [None], [1], 8, lockstep=alone_in_trouble)
    assert reports == [(False, True)]  # told before raising


@pytest.mark.slow
def test_the_reward_rises_on_an_arithmetic_task(tokenizer_model, tmp_path):
    """A tiny model pretrained for 100 steps on sums of two digits ("3+4=7", one per document) answers about 10% of
    the 55 prompts "a+b=" right; 60 GRPO steps with the exact-answer reward (16 prompts x 8 completions of 2
    tokens a step, the shipped config otherwise) raise the mean reward of the last 10 steps at least 0.03 above the
    first 10's (measured: 0.099 → 0.214 at this seed; +0.048 to +0.090 at seeds 1-7; with lr 0: -0.010, and a
    10-step mean of ~1,280 completions varies by ~0.01). A sign error, a wrong advantage or no update leaves it
    flat or lower."""
    from conftest import FAST, TINY_CONFIG

    recipe = os.path.join(REPO, "recipes", "arithmetic.py")  # the shipped reward and its data
    spec = importlib.util.spec_from_file_location("arithmetic", recipe)
    arithmetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arithmetic)
    corpus, prompts = arithmetic.write(str(tmp_path / "data"), digits=1, seed=0, documents=20000)
    for kind, src, out in (("pretrain", corpus, "pre"), ("prompts", prompts, "prompts")):
        assert preprocess_main(["shards", "--kind", kind, "--input", src, "--tokenizer", tokenizer_model,
                                "--out", str(tmp_path / out), "--max-len", "16"]) == 0
    run_training(f"data.path={tmp_path / 'pre'}", *FAST, "train.micro_batch_size=8", "train.warmup_steps=5",
                 "train.max_steps=100", "train.lr=3e-3", f"out_dir={tmp_path / 'pretrained'}",
                 config=TINY_CONFIG)
    run_training(f"data.path={tmp_path / 'prompts'}", f"init_from={tmp_path / 'pretrained'}", "data.seq_len=16",
                 # every prompt trains; the shipped evaluations run with no validation prompt (they report nothing)
                 "data.val_fraction=0", "grpo.max_new_tokens=2", "grpo.generations=8",
                 f"grpo.rewards=[{recipe}:exact_answer]", "train.micro_batch_size=16", "grpo.prompts_per_step=16",
                 "train.max_steps=60", "train.lr=3e-3", "train.warmup_steps=2", "log.every=1",
                 "grpo.max_empty_steps=60", f"out_dir={tmp_path / 'grpo'}", stage="grpo", config=GRPO_CONFIG)
    rewards = [r["reward"] for r in records(tmp_path / "grpo") if "reward" in r]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert len(rewards) == 60 and 0 < first < 0.2 and last >= first + 0.03, (first, last)


def test_chat_prompts_in_a_models_template_are_what_transformers_renders(tmp_path):
    """A message prompt's ids are transformers' apply_chat_template(..., add_generation_prompt=True) of the same
    messages with the model's own tokenizer (Qwen3's, with an option); the ids GRPO stops a completion at are the
    template's end of turn. (Each family's template against transformers for SFT/DPO: test_chat_template.py.)"""
    model = "qwen3"
    from conftest import shared_data

    transformers = pytest.importorskip("transformers")
    from preprocess.tokenizer import load_tokenizer
    from training.data.sources import open_sources
    from training.models.decoding import tokenizer_template

    directory = shared_data("tokenizers", model)
    messages = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "17+25="}]
    src = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": messages, "answer": "42"}, {"prompt": "17+25="}])
    out = str(tmp_path / "shards")
    kwargs = ["--chat-template-kwargs", '{"enable_thinking": false}']
    assert preprocess_main(["shards", "--kind", "prompts", "--input", src, "--tokenizer", directory, "--out", out,
                            "--max-len", "256", *kwargs]) == 0
    source = open_sources([out], 256, 0.0, "prompts", 1)[0]
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             enable_thinking=False)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert source.example(0)[0][0][:-1].tolist() == list(expected)
    assert source.example(1)[0][0][:-1].tolist() == reference("17+25=", add_special_tokens=False)["input_ids"]
    ends = tokenizer_template(load_tokenizer(os.path.join(out, source.tokenizer["file"]))).end_ids()
    assert reference.convert_tokens_to_ids("<|im_end|>") in ends
