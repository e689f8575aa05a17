"""Every preference loss against TRL's own code (TRL is a test-only dependency), and the values each takes when
the policy is still the reference. TRL's trainers are not built (that needs a model hub and datasets): their loss
methods run on a stand-in `self` holding the attributes they read, fed the logits of a batch through a stand-in
model, so that TRL computes the log-probs, averages and NLL its own way and we compute ours from the same
logits."""

import functools
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    CHAT,
    DPO_CONFIG,
    KTO_CONFIG,
    kill_after_first_checkpoint,
    losses,
    private_copy,
    run_training,
    start_training,
)

from training.stages.losses import IGNORE, PREFERENCE_LOSSES, preference_loss, sequence_tokens

trl = pytest.importorskip("trl", reason="TRL is the reference for the loss formulas (pip install trl)")

PAIRS, WIDTH, VOCAB = 5, 12, 17


def batch(seed: int, equal_chosen: bool = False):
    """Logits of 2 x PAIRS sequences (chosen, then rejected), TRL's completion masks and our targets. Each
    sequence's first token is its whole prompt; `equal_chosen`: every chosen completion as long as the others."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * PAIRS, WIDTH, VOCAB, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, VOCAB, (2 * PAIRS, WIDTH), generator=g)
    lengths = torch.randint(3, WIDTH, (2 * PAIRS,), generator=g)  # tokens after the one-token prompt
    if equal_chosen:
        lengths[:PAIRS] = WIDTH - 2
    positions = torch.arange(WIDTH)
    attention = (positions <= lengths[:, None]).long()
    completion = attention * (positions >= 1)
    labels = ids.masked_fill(completion == 0, IGNORE)  # TRL's labels: completion tokens, in place
    return SimpleNamespace(logits=logits, ids=ids, attention=attention, completion=completion, labels=labels)


def ours(name: str, b, ref: tuple[torch.Tensor, torch.Tensor] | None, beta: float, **options):
    """Our losses from the same log-probs (in float64: sequence_logps computes in float32, as training does)
    and our token counts of the shifted targets."""
    logps = token_logps(b.logits, b.labels).sum(dim=-1)
    tokens = sequence_tokens(b.labels[:, 1:])
    rc, rr = ref if ref is not None else (None, None)
    losses, metrics = preference_loss(name, logps[:PAIRS], logps[PAIRS:], rc, rr, beta=beta,
                                      chosen_tokens=tokens[:PAIRS], rejected_tokens=tokens[PAIRS:], **options)
    return losses, {k: float(v.mean()) for k, v in metrics.items()}


def token_logps(logits, labels):
    """What TRL's fused LM head returns per position: log p(label), 0 where there is none."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * (targets != IGNORE)


def trl_dpo(loss_types: list[str], b, ref, beta: float, label_smoothing: float = 0.0, weights=None):
    """TRL's DPOTrainer._compute_loss with precomputed reference log-probs: (loss, mean metrics)."""
    from trl import DPOTrainer

    def model(input_ids, attention_mask, labels, use_cache, fused_lm_head):
        zeros = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
        return SimpleNamespace(log_probs=token_logps(b.logits, labels), entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, loss_types=loss_types,
                           loss_weights=weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
                           f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True,
                           use_weighting=False, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
                           _metrics=defaultdict(lambda: defaultdict(list)), args=SimpleNamespace(discopop_tau=0.05))
    inputs = {"input_ids": b.ids, "attention_mask": b.attention, "completion_mask": b.completion,
              "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


def stand_in(trainer_class, b, **attributes):
    """A `self` for CPOTrainer's or ORPOTrainer's batch methods: the batch's logits come from a stand-in model."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(accelerator=accelerator, is_encoder_decoder=False, pad_token_id=0, padding_value=0,
                           aux_loss_enabled=False,
                           label_smoothing=0.0, alpha=0.0, **attributes)
    fake.concatenated_inputs = lambda batch, **_: {"concatenated_input_ids": b.ids,
                                                   "concatenated_attention_mask": b.attention,
                                                   "concatenated_labels": b.labels}
    fake.get_batch_logps = trainer_class.get_batch_logps
    fake.concatenated_forward = functools.partial(trainer_class.concatenated_forward, fake)
    return fake


def model_of(b):
    return lambda input_ids, attention_mask, use_cache: SimpleNamespace(logits=b.logits)


def trl_simpo(b, beta: float, simpo_gamma: float, label_smoothing: float, cpo_alpha: float):
    from trl.experimental.cpo import CPOTrainer

    fake = stand_in(CPOTrainer, b, beta=beta, loss_type="simpo", simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha)
    fake.label_smoothing = label_smoothing
    fake.cpo_loss = functools.partial(CPOTrainer.cpo_loss, fake)
    loss, metrics = CPOTrainer.get_batch_loss_metrics(fake, model_of(b), {"chosen_labels": b.labels[:PAIRS]})
    return float(loss), metrics


def trl_orpo(b, beta: float):
    from trl.experimental.orpo import ORPOTrainer

    fake = stand_in(ORPOTrainer, b, beta=beta)
    fake.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, fake)
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(fake, model_of(b), {"chosen_labels": b.labels[:PAIRS]})
    return float(loss), metrics


def reference_of(b, seed: int):
    """Reference log-probs near the policy's, so that rewards have both signs."""
    g = torch.Generator().manual_seed(seed + 100)
    logps = token_logps(b.logits, b.labels).sum(dim=-1)
    return logps[:PAIRS] + torch.randn(PAIRS, generator=g, dtype=torch.float64), \
        logps[PAIRS:] + torch.randn(PAIRS, generator=g, dtype=torch.float64)


SHARED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
          "logps/rejected")


def assert_same(loss, metrics, trl_loss, trl_metrics, names=SHARED, rel_float32=()):
    """float64 on both sides, to 1e-9; the names in rel_float32 TRL computes in float32 itself."""
    assert float(loss.mean()) == pytest.approx(trl_loss, rel=1e-6 if "loss" in rel_float32 else 1e-9, abs=1e-12)
    for name in names:
        # TRL averages the accuracies (a share of pairs, k/n) as float32
        rel = 1e-6 if name == "rewards/accuracies" or name in rel_float32 else 1e-9
        assert metrics[name] == pytest.approx(float(trl_metrics[name]), rel=rel, abs=1e-12), name


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, options", [
    ("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.0}),
    ("robust", {"label_smoothing": 0.2}),
])
def test_reference_based_losses_equal_trls_dpo_trainer(name, options, seed):
    b = batch(seed)
    ref = reference_of(b, seed)
    for beta in (0.1, 0.7):
        loss, metrics = ours(name, b, ref, beta, **options)
        assert_same(loss, metrics, *trl_dpo([name], b, ref, beta, **options))


def test_rpo_alpha_equals_trls_sigmoid_plus_weighted_sft_loss():
    """TRL 1.x writes rpo_alpha as loss_type=[sigmoid, sft] with weights [1, α]. Its sft term is the mean NLL over
    every chosen token of the batch, ours the mean over pairs of each completion's mean NLL (a sum over pairs,
    as every loss of ours is): the two agree when the chosen completions are equally long, as here."""
    b = batch(3, equal_chosen=True)
    ref = reference_of(b, 3)
    loss, metrics = ours("sigmoid", b, ref, 0.3, rpo_alpha=0.5)
    trl_loss, trl_metrics = trl_dpo(["sigmoid", "sft"], b, ref, 0.3, weights=[1.0, 0.5])
    assert_same(loss, metrics, trl_loss, trl_metrics)
    plain, _ = ours("sigmoid", b, ref, 0.3)
    assert float(loss.mean()) > float(plain.mean())  # the NLL term is there


def test_conservative_dpo_equals_trls_label_smoothed_sigmoid():
    """cDPO (sigmoid with label_smoothing) left TRL's DPOTrainer in 1.x; its formula lives on in CPOTrainer's
    sigmoid loss, which is the same function of the log-ratios CPO is given."""
    from trl.experimental.cpo import CPOTrainer

    b = batch(4)
    rc, rr = reference_of(b, 4)
    loss, metrics = ours("sigmoid", b, (rc, rr), 0.4, label_smoothing=0.15)
    logps = token_logps(b.logits, b.labels).sum(dim=-1)
    fake = SimpleNamespace(alpha=0.0, beta=0.4, loss_type="sigmoid", label_smoothing=0.15,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, logps[:PAIRS] - rc, logps[PAIRS:] - rr)
    torch.testing.assert_close(loss, trl_losses, rtol=1e-9, atol=1e-12)
    assert metrics["rewards/margins"] == pytest.approx(float((chosen_rewards - rejected_rewards).mean()), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gamma, smoothing, cpo_alpha", [(0.5, 0.0, 0.0), (1.2, 0.1, 0.0), (0.5, 0.0, 1.0)])
def test_simpo_equals_trls_cpo_trainer(seed, gamma, smoothing, cpo_alpha):
    # TRL's NLL is a mean over every chosen token of the batch; with equal chosen lengths it is ours (see rpo_alpha)
    b = batch(seed, equal_chosen=bool(cpo_alpha))
    loss, metrics = ours("simpo", b, None, 2.0, simpo_gamma=gamma, label_smoothing=smoothing, cpo_alpha=cpo_alpha)
    trl_loss, trl_metrics = trl_simpo(b, 2.0, gamma, smoothing, cpo_alpha)
    assert_same(loss, metrics, trl_loss, trl_metrics, SHARED + (("nll_loss",) if cpo_alpha else ()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orpo_equals_trls_orpo_trainer(seed):
    """TRL's ORPO NLL covers prompt and completion; with a one-token prompt (never a target) that is the
    completion alone, which is the NLL ORPO's paper and ours take. ORPOTrainer.odds_ratio_loss casts the
    log-probs to float32 itself, so the odds terms, the rewards it derives from those, and the loss can agree only
    to float32's precision; the log-probs and the NLL agree to 1e-9."""
    b = batch(seed, equal_chosen=True)
    odds = ("loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected", "rewards/margins")
    for beta in (0.1, 1.0):
        loss, metrics = ours("orpo", b, None, beta)
        trl_loss, trl_metrics = trl_orpo(b, beta)
        assert_same(loss, metrics, trl_loss, trl_metrics, SHARED + ("nll_loss",) + odds[1:3], rel_float32=odds)


def test_every_loss_is_covered_by_a_parity_test():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"}


@pytest.mark.parametrize("name, options, expected", [
    ("sigmoid", {}, lambda beta: math.log(2)),
    ("sigmoid", {"label_smoothing": 0.1}, lambda beta: math.log(2)),
    ("robust", {"label_smoothing": 0.3}, lambda beta: math.log(2)),
    ("hinge", {}, lambda beta: 1.0),
    ("ipo", {}, lambda beta: (1 / (2 * beta)) ** 2),
])
def test_at_the_start_each_reference_based_loss_has_its_known_value_and_no_reward(name, options, expected):
    g = torch.Generator().manual_seed(5)
    chosen, rejected = -20 * torch.rand(2, 6, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 30, (2, 6), generator=g)
    for beta in (0.1, 0.5):
        losses, metrics = preference_loss(name, chosen, rejected, chosen.clone(), rejected.clone(), beta=beta,
                                          chosen_tokens=tokens[0], rejected_tokens=tokens[1], **options)
        torch.testing.assert_close(losses, torch.full_like(losses, expected(beta)), rtol=1e-12, atol=1e-12)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert not metrics[key].any(), key


def test_the_reference_free_losses_ignore_any_reference_given():
    g = torch.Generator().manual_seed(6)
    chosen, rejected = -10 * torch.rand(2, 4, generator=g, dtype=torch.float64)
    tokens = torch.tensor([3, 4, 5, 6])
    for name in ("simpo", "orpo"):
        plain, _ = preference_loss(name, chosen, rejected, None, None, beta=0.2, chosen_tokens=tokens,
                                   rejected_tokens=tokens)
        given, _ = preference_loss(name, chosen, rejected, chosen + 1, rejected - 1, beta=0.2, chosen_tokens=tokens,
                                   rejected_tokens=tokens)
        torch.testing.assert_close(plain, given)


def test_token_counts_are_the_same_padded_and_packed():
    """The length normalisation of ipo, simpo and orpo counts each sequence's targets, whatever the layout."""
    import numpy as np

    from training.data.batch import layout_rows

    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 50, n), (np.arange(n) >= 2).astype(np.uint8)) for n in (5, 9, 4, 12)]
    _, padded, _, _ = layout_rows([[(t, m, i)] for i, (t, m) in enumerate(docs)], pad_id=0)
    _, packed, segments, _ = layout_rows([[(*docs[0], 0), (*docs[2], 2)], [(*docs[1], 1), (*docs[3], 3)]], pad_id=0)
    assert sequence_tokens(padded).tolist() == [n - 2 for n in (5, 9, 4, 12)]
    assert sequence_tokens(packed, segments, 4).tolist() == sequence_tokens(padded).tolist()


# ---------------------------------------------------------------------------------------------- end to end

START = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * 0.5)) ** 2}  # beta 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name, options", [
    ("sigmoid", []),  # cDPO (label_smoothing) differs only in its formula, checked against TRL above
    ("robust", ["dpo.label_smoothing=0.2"]),
    ("hinge", []),
    ("ipo", ["dpo.rpo_alpha=0.5"]),  # its value at the start (no NLL term) is checked above
    ("simpo", ["dpo.cpo_alpha=0.5"]),
    ("orpo", []),
])
def test_each_loss_trains_alike_on_two_processes_and_resumes_after_kill_9(name, options, chat_shards, sft_run,
                                                                        tmp_path):
    """The shipped DPO config (evaluation and its sample on) with each loss: 1 process x accumulation 2, against
    2 processes x 1 that are killed -9 after their first checkpoint and resumed. A resume that lost or repeated
    anything (data position, optimizer state, the pinned reference) would leave the 1-process trajectory by far
    more than 1e-5; bit-exact resume on the same processes is test_finetune's."""
    common = [f"data.path={chat_shards['dpo']}", f"init_from={sft_run}", "train.max_steps=5", "train.ckpt_every=2",
              "train.eval_every=2", "train.eval_samples=8", f"dpo.loss={name}", *options, *CHAT]
    one, two = tmp_path / "one", tmp_path / "two"
    run_training(*common, f"out_dir={one}", "train.grad_accum=2", stage="dpo", config=DPO_CONFIG)
    kill_after_first_checkpoint(start_training(*common, f"out_dir={two}", nproc=2, stage="dpo", config=DPO_CONFIG),
                                two)
    assert not os.path.exists(two / "checkpoints" / "step-4")
    run_training(*common, f"out_dir={two}", nproc=2, stage="dpo", config=DPO_CONFIG)
    keys = ["loss", "val_loss", "logps/chosen", "logps/rejected"]
    keys += ["nll_loss"] if options and "alpha" in options[0] else []
    for key in keys:
        a, b = losses(one, key), losses(two, key)
        assert sorted(a) == sorted(b) and a, key
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (key, step, a[step], b[step])
    if PREFERENCE_LOSSES[name].reference:
        # A reward is β x (a difference of two summed log-probs of ~100 each): its last digits are those of the
        # sums, which another reduction order moves by a few float32 steps (seen: margins 0.08398020 vs
        # 0.08397877 at rel 1e-5). So rewards are compared at the scale of the log-probs they come from, 1e-6 of
        # it (~1e-4 here), and only where they are well above that scale: a wrong reward would not pass.
        logps = {k: losses(one, f"logps/{k}") for k in ("chosen", "rejected")}
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            a, b = losses(one, key), losses(two, key)
            for step in a:
                tolerance = 1e-6 * 0.5 * (abs(logps["chosen"][step]) + abs(logps["rejected"][step]))  # beta 0.5
                assert abs(b[step] - a[step]) <= tolerance, (key, step, a[step], b[step])
            assert abs(a[5]) > 20 * tolerance, key  # by the last step the comparison means something
    train = losses(one)
    assert train[5] < train[1]  # it learns
    reference_free = not PREFERENCE_LOSSES[name].reference
    assert os.path.exists(one / "reference") != reference_free  # no reference model is pinned without a reference
    if name in START and "rpo_alpha" not in " ".join(options):
        assert train[1] == pytest.approx(START[name], abs=1e-6)  # before any update the policy is the reference
        assert losses(one, "val_loss")[0] == pytest.approx(START[name], abs=1e-6)
        assert losses(one, "rewards/margins")[1] == 0 and losses(one, "rewards/chosen")[1] == 0


@pytest.mark.parametrize("overrides, message", [
    (["dpo.loss=kto_pair"], "dpo.loss: 'kto_pair' is not one of sigmoid, robust, hinge, ipo, simpo, orpo"),
    (["dpo.simpo_gamma=1.0"], "dpo.simpo_gamma: dpo.loss=sigmoid does not use it (it is for simpo)"),
    (["dpo.loss=hinge", "dpo.label_smoothing=0.1"], "dpo.label_smoothing: dpo.loss=hinge does not use it"),
    (["dpo.loss=robust", "dpo.label_smoothing=0.5"], "dpo.label_smoothing: must be in [0, 0.5)"),
    (["dpo.loss=orpo", "dpo.precompute_ref=true"], "dpo.precompute_ref: dpo.loss=orpo uses no reference model"),
    (["dpo.beta=0"], "dpo.beta: must be positive"),
])
def test_a_wrong_preference_option_is_one_line_naming_the_key(overrides, message):
    from preprocess.errors import UserError
    from training.config import load_config

    with pytest.raises(UserError) as e:
        load_config(DPO_CONFIG, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------- KTO

def trl_kto(b, kl_b, labels, ref, ref_kl, beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer._compute_loss with precomputed reference log-probs and its KL estimate on: (loss, metrics)."""
    from trl import KTOTrainer

    def model(input_ids, attention_mask, labels, use_cache, fused_lm_head):
        source = kl_b if input_ids is kl_b.ids else b
        zeros = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
        return SimpleNamespace(log_probs=token_logps(source.logits, labels), entropy=zeros, mean_logits=zeros)

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, calculate_KL=True,
                           precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight, aux_loss_enabled=False, _total_train_tokens=0,
                           _tp_size=1, _metrics=defaultdict(lambda: defaultdict(list)))
    fake._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, fake)
    inputs = {"input_ids": b.ids, "attention_mask": b.attention, "completion_mask": b.completion,
              "KL_input_ids": kl_b.ids, "KL_attention_mask": kl_b.attention, "KL_completion_mask": kl_b.completion,
              "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("seed, weights", [(0, (1.0, 1.0)), (1, (1.0, 1.0)), (2, (1.33, 0.7))])
def test_kto_equals_trls_kto_trainer(seed, weights):
    from training.stages.losses import kl_estimate, kto_loss, kto_summary

    b, kl_b = batch(seed), batch(seed + 50)  # 2 x PAIRS completions, and as many mismatched KL sequences
    labels = torch.Generator().manual_seed(seed)
    labels = torch.rand(2 * PAIRS, generator=labels) < 0.5
    labels[:2] = torch.tensor([True, False])  # both kinds present
    logps, kl_logps = token_logps(b.logits, b.labels).sum(-1), token_logps(kl_b.logits, kl_b.labels).sum(-1)
    g = torch.Generator().manual_seed(seed + 7)
    ref = logps + torch.randn(2 * PAIRS, generator=g, dtype=torch.float64)
    ref_kl = kl_logps - 2 + torch.randn(2 * PAIRS, generator=g, dtype=torch.float64)  # a positive KL
    kl = kl_estimate(kl_logps.sum(), ref_kl.sum(), torch.tensor(2 * PAIRS))
    assert kl > 0
    losses, sums = kto_loss(logps, ref, labels, kl, beta=0.3, desirable_weight=weights[0],
                            undesirable_weight=weights[1])
    metrics = kto_summary({k: float(v[0] / v[1]) for k, v in sums.items()})
    trl_loss, trl_metrics = trl_kto(b, kl_b, labels, ref, ref_kl, 0.3, *weights)
    assert float(losses.mean()) == pytest.approx(trl_loss, rel=1e-9)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[name] == pytest.approx(float(trl_metrics[name]), rel=1e-9), name


def test_kto_reference_point_is_clamped_at_zero_and_never_differentiated():
    from training.stages.losses import kl_estimate

    policy = torch.tensor(-10.0, requires_grad=True)
    assert kl_estimate(policy, torch.tensor(-8.0), torch.tensor(4)) == 0  # the policy below the reference
    z0 = kl_estimate(policy, torch.tensor(-12.0), torch.tensor(4))
    assert float(z0) == pytest.approx(0.5) and not z0.requires_grad


@pytest.mark.slow
def test_kto_trains_alike_on_two_processes_resumes_after_kill_9_and_precomputes_its_reference(chat_shards, sft_run,
                                                                                               tmp_path):
    """The shipped KTO config (evaluation and its sample on): 1 process x accumulation 2 against 2 processes x 1
    killed -9 after their first checkpoint and resumed (1e-5: the reference point z₀ is the whole global
    batch's), and against a precomputed reference (which pads its batches otherwise: 1e-4)."""
    shards = private_copy(chat_shards["kto"], tmp_path / "kto-shards")  # its reference cache stays in this test
    common = [f"data.path={shards}", f"init_from={sft_run}", "train.max_steps=5", "train.ckpt_every=2",
              "train.eval_every=2", "train.eval_samples=9", *CHAT]
    one, two, pre = tmp_path / "one", tmp_path / "two", tmp_path / "pre"
    run_training(*common, f"out_dir={one}", "train.grad_accum=2", stage="kto", config=KTO_CONFIG)
    kill_after_first_checkpoint(start_training(*common, f"out_dir={two}", nproc=2, stage="kto", config=KTO_CONFIG),
                                two)
    assert not os.path.exists(two / "checkpoints" / "step-4")
    run_training(*common, f"out_dir={two}", nproc=2, stage="kto", config=KTO_CONFIG)
    run_training(*common, f"out_dir={pre}", "train.grad_accum=2", "dpo.precompute_ref=true", stage="kto",
                 config=KTO_CONFIG)
    for other, rel in ((two, 1e-5), (pre, 1e-4)):
        for key in ("loss", "val_loss", "logps/chosen", "logps/rejected", "kl"):
            a, b = losses(one, key), losses(other, key)
            assert sorted(a) == sorted(b) and a, key
            for step in a:
                assert b[step] == pytest.approx(a[step], rel=rel, abs=1e-6), (other.name, key, step)
    train = losses(one)
    # before any update the policy is the reference: every log-ratio and z₀ are 0, and each loss is 1 − σ(0)
    assert train[1] == pytest.approx(0.5, abs=1e-6) and losses(one, "val_loss")[0] == pytest.approx(0.5, abs=1e-6)
    assert losses(one, "kl")[1] == 0 and losses(one, "rewards/margins")[1] == 0
    assert max(losses(one, "kl").values()) > 0 and min(losses(one, "kl").values()) >= 0  # estimated, and clamped
    assert losses(one, "rewards/margins")[5] > 0 and train[5] < train[1]  # it learns the labels


def test_each_kto_example_has_a_fixed_partner_of_its_own_split_for_its_kl_sequence(chat_shards):
    import numpy as np

    from training.data.order import BatchPlan
    from training.data.sources import open_sources
    from training.stages.kto import LabelledBatches

    sources = open_sources([chat_shards["kto"]], 63, 0.1, "kto", documents=1)
    source = sources[0]
    plan = BatchPlan(micro_batch=4, grad_accum=1, world=1, rank=0)
    data = LabelledBatches(sources, [1.0], 0, plan, 10_000, pad_id=0, seq_len=63)
    for j in range(source.n_train + source.n_val):
        p = data.partner(0, j)
        assert p != j and (p < source.n_train) == (j < source.n_train)
        tokens, mask = source.example(j)[0]
        other, other_mask = source.example(p)[0]
        ids, learned = data.kl_sequence(0, j)
        prompt = int(np.argmax(mask > 0))
        assert ids[:prompt].tolist() == tokens[:prompt].tolist()  # this example's prompt ...
        completion = other[other_mask > 0]
        assert ids[learned == 1].tolist() == completion[: int(learned.sum())].tolist()  # ... its partner's reply
    batch = data.collate([[(0, 0)], [(0, 1)], [(0, 2)]])
    assert batch.inputs.shape[0] == batch.kl_rows.inputs.shape[0] == 3
    assert batch.labels.tolist() == [float(source.example(j)[0][1].max() == 1) for j in range(3)]
    # a split too small for partners (here the validation split, of 3) gives KL rows without any target
    sources = open_sources([chat_shards["kto"]], 63, 0.005, "kto", documents=1)
    small = LabelledBatches(sources, [1.0], 0, plan, 10_000, pad_id=0, seq_len=63)
    assert sources[0].n_val == 3
    val = sources[0].n_train
    assert small.partner(0, val) is None and small.partner(0, 0) is not None
    assert not small.kl_sequence(0, val)[1].any()
