"""data.schedule: the sources' mixture changing over training, in stages or a linear anneal. The order stays a
function of (seed, position): realised shares follow the schedule, a stage boundary neither repeats nor skips a
sample, 1 x 4 = 2 x 2 and a resume are exact across boundaries, and a resume that would change what was read is
refused."""

import shutil
import signal

import numpy as np
import pytest
from conftest import TINY_CONFIG, losses, run_training

from preprocess.errors import UserError
from training.config import DataConfig, MixStage, data_schedule, load_config
from training.data.order import ANNEAL_PIECES, Mixture, SampleOrder
from training.describe import describe

BATCH = 64  # samples per step in the unit tests
STOPPED = 128 + signal.SIGTERM  # a run stopped as by a preemption notice, its checkpoint written


def schedule(stages, *names) -> list[MixStage]:
    return data_schedule(DataConfig(path=list(names or ("a", "b", "c")), schedule=stages))


def test_realised_shares_follow_each_stage_and_the_anneal_within_one_percent():
    stages = schedule([{"until_step": 100, "weights": {"a": 1}},
                       {"until_step": 300, "weights": {"a": 0.2, "b": 0.3, "c": 0.5}, "anneal": True},
                       {"weights": {"a": 1, "b": 1}}])
    mixture = Mixture.scheduled(stages, lambda step: step * BATCH)
    assert len(mixture.starts) == 2 + ANNEAL_PIECES
    source, _ = SampleOrder([997, 1500, 3000], mixture, seed=3)(np.arange(400 * BATCH))

    def shares(first_step, end_step):
        picked = source[first_step * BATCH:end_step * BATCH]
        return np.bincount(picked, minlength=3) / len(picked)

    assert np.abs(shares(0, 100) - [1, 0, 0]).max() == 0
    assert np.abs(shares(300, 400) - [0.5, 0.5, 0]).max() < 0.01
    start, end = np.array([1.0, 0, 0]), np.array([0.2, 0.3, 0.5])
    for a in range(100, 300, 20):  # every 20 steps of the anneal: the line's mean over them
        line = start + ((a + 10) - 100) / 200 * (end - start)
        assert np.abs(shares(a, a + 20) - line).max() < 0.01, (a, shares(a, a + 20), line)


def test_a_boundary_neither_repeats_nor_skips_a_sample_and_the_order_is_a_function_of_position():
    stages = schedule([{"until_step": 7, "weights": {"a": 3, "b": 1}}, {"until_step": 9, "weights": {"b": 1}},
                       {"until_step": 20, "weights": {"a": 1, "b": 1}, "anneal": True}], "a", "b")
    sizes = [101, 37]
    order = SampleOrder(sizes, Mixture.scheduled(stages, lambda step: step * 10), seed=11)
    source, sample = order(np.arange(600))
    for s, n in enumerate(sizes):  # each source's picks, read in order: whole epochs, each a permutation
        mine = sample[source == s]
        for e in range(len(mine) // n):
            assert sorted(mine[e * n:(e + 1) * n]) == list(range(n))
    assert (source[70:90] == 1).all() and len(set(sample[:70][source[:70] == 0])) == (source[:70] == 0).sum()
    again = SampleOrder(sizes, Mixture.scheduled(stages, lambda step: step * 10), seed=11)
    for chunk in np.array_split(np.random.default_rng(0).permutation(600), 7):  # any positions, in any order
        got = again(chunk)
        assert (got[0] == source[chunk]).all() and (got[1] == sample[chunk]).all()
    counts = order.counts(333)
    assert list(counts) == [int((source[:333] == s).sum()) for s in range(2)]


@pytest.mark.parametrize("stages, error", [
    ([{"weights": {"a": 1}}, {"weights": {"b": 1}}], "data.schedule[0]: until_step is missing"),
    ([{"until_step": 5, "weights": {"a": 1}}, {"until_step": 5, "weights": {"b": 1}}],
     "data.schedule[1].until_step: 5 is not a step after 5"),
    ([{"until_step": 5, "weights": {"d": 1}}], "data.schedule[0].weights: d is not a source of data.path (they are: "
                                               "a, b, c)"),
    ([{"until_step": 5, "weights": {"a": 1}, "anneal": True}], "data.schedule[0].anneal: True"),
    ([{"until_step": 5, "weights": {"a": 0}}], "data.schedule[0].weights: every weight is 0"),
    ([{"until_step": 5, "weights": {"a": -1}}], "data.schedule[0].weights: expected {source: weight >= 0}"),
    ([{"until": 5, "weights": {"a": 1}}], "data.schedule[0]: expected {until_step: N"),
])
def test_a_wrong_schedule_is_one_line_naming_the_stage(stages, error):
    with pytest.raises(UserError) as e:
        schedule(stages)
    assert str(e.value).startswith(error) and "\n" not in str(e.value)


def test_across_stage_boundaries_one_by_four_is_two_by_two_and_a_resume_is_exact(pretrain_shards, tmp_path):
    """Two sources, a stage of one, an anneal, then half and half. One process x 4 micro-steps, and 2 processes x 2
    stopped at step 4 (inside the anneal) and resumed with a schedule changed only past what the run reads: the
    same losses at every step, and the same realised mixture logged. A schedule changed before the resume point
    is refused; describe prints the stages."""
    for name in ("a", "b"):
        shutil.copytree(pretrain_shards, tmp_path / name, ignore=shutil.ignore_patterns("ref_logps-*"))
    data = f"data.path=[{tmp_path / 'a'},{tmp_path / 'b'}]"
    stages = ("{until_step: 3, weights: {a: 1}}, {until_step: 6, weights: {a: 0.25, b: 0.75}, anneal: true}, "
              "{weights: {a: 1, b: 1}}")
    common = [data, "train.max_steps=8", "train.eval_every=4", "train.ckpt_every=100"]
    run_training(*common, f"data.schedule=[{stages}]", "train.grad_accum=4", f"out_dir={tmp_path / 'one'}")
    run_training(*common, f"data.schedule=[{stages}]", "train.grad_accum=2", f"out_dir={tmp_path / 'two'}", nproc=2,
                 hooks="stop@4", expect=STOPPED)
    later = stages.replace("{weights: {a: 1, b: 1}}", "{until_step: 8, weights: {a: 1, b: 1}}, {weights: {b: 1}}")
    run_training(*common, f"data.schedule=[{later}]", "train.grad_accum=2", f"out_dir={tmp_path / 'two'}", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")  # what differs lies past step 8: unread
    assert len(one) == len(two) == 8
    for step, value in one.items():  # the sums of 2 processes are added in another order: rounding apart
        assert two[step] == pytest.approx(value, rel=1e-5), step
    shares = [losses(tmp_path / run, "mixture/a") for run in ("one", "two")]
    assert shares[0] == shares[1] and [shares[0][s] for s in (1, 2, 3, 7, 8)] == [1, 1, 1, 0.5, 0.5]
    assert 1 > shares[0][4] > shares[0][5] > shares[0][6] > 0.25

    wider = run_training(data, f"data.schedule=[{stages}]", "train.max_steps=9", "train.micro_batch_size=8",
                         f"out_dir={tmp_path / 'two'}", check=False)
    assert wider.returncode == 1 and "resume with the checkpoint's global batch of 16 (this run's is 8)" in wider.stderr
    earlier = f"data.schedule=[{stages.replace('until_step: 3', 'until_step: 2')}]"
    proc = run_training(data, earlier, "train.max_steps=9", "train.grad_accum=4", f"out_dir={tmp_path / 'two'}",
                        check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "read 128 samples of its data mixed as from sample 0: 1, 0; from sample 48:" in proc.stderr
    assert "the schedule may change only after that point" in proc.stderr

    described = describe(load_config(TINY_CONFIG, [data, f"data.schedule=[{stages}]", "train.max_steps=8",
                                                   "train.micro_batch_size=8"]))
    assert "  steps 3–6 (linear anneal): a 100% → 25%: " in described and "  steps 6–8: a 50%: 8 samples" in described


def test_a_schedule_is_refused_with_packing(chat_shards):
    """With packing a step reads rows of several examples, while the stages are placed in the examples' order."""
    from conftest import SFT_CONFIG

    cfg = load_config(SFT_CONFIG, [f"data.path={chat_shards['sft']}", "data.packing=true",
                                   "data.schedule=[{weights: {sft: 1}}]", "init_from=null"])
    with pytest.raises(UserError, match="^data.schedule: not with data.packing"):
        describe(cfg)
