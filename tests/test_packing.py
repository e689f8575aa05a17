"""Packed rows with per-document attention (SFT, DPO), document-masked pretraining, validation per source and
bits per byte."""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import (
    CHAT,
    DPO_CONFIG,
    MIXED_TEXTS,
    REPO,
    SFT_CONFIG,
    kill_after_first_checkpoint,
    losses,
    private_copy,
    run_command,
    run_training,
    shakespeare_plays,
    start_training,
    val_losses,
    write_jsonl,
)

from training.data.batch import ExampleBatches
from training.data.order import BatchPlan
from training.data.packing import best_fit
from training.data.sources import ExampleSource, ShardSource
from training.models.transformer import ModelConfig, Transformer
from training.stages.dpo import DPO, PairBatches
from training.stages.losses import PREFERENCE_LOSSES, next_token_loss, preference_loss, sequence_logps, sequence_tokens
from training.stages.pretrain import PretrainData
from training.stages.reference import LiveReference

# The test conversations take ~40 positions: rows of 127 hold about three. The starting model needs that context.
ROW = 127
# (model.* only passes the config's own check: the shape comes from init_from)
PACKED = ["data.packing=true", f"data.seq_len={ROW}", "train.micro_batch_size=2", "model.max_seq_len=256"]


def tiny_model(seed=0, vocab=1024) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256))


# ------------------------------------------------------------------------------------------------ the plan

def test_best_fit_places_every_example_once_and_leaves_at_most_one_row_half_empty():
    rng = np.random.default_rng(0)
    for capacity in (64, 255):
        lengths = rng.integers(1, capacity + 1, size=500)
        rows = best_fit(lengths, capacity)
        assert sorted(i for row in rows for i in row) == list(range(500))
        fills = [int(lengths[row].sum()) for row in rows]
        assert max(fills) <= capacity
        # any-fit: a second row at most half full would have taken its items in the first one
        assert sum(f <= capacity / 2 for f in fills) <= 1
        assert len(rows) < 0.75 * len(lengths)
        assert best_fit(lengths, capacity) == rows  # the lengths alone decide


def test_rows_of_a_step_do_not_depend_on_processes_accumulation_or_where_the_run_started(chat_shards):
    src = [ExampleSource(chat_shards["sft"], ROW, 0.05, "sft", group=1, packed=True)]

    def data(plan):
        return ExampleBatches(src, [1.0], 7, plan, 1024, pad_id=0, seq_len=ROW, pack_window=64)

    single = data(BatchPlan(2, 4, 1))
    pair = [data(BatchPlan(2, 2, 2, r)) for r in (0, 1)]
    for step in range(40):  # past several packing windows
        consumed = step * 8
        one = [single.rows(single.plan.micro_indices(consumed, m)) for m in range(4)]
        two = [d.rows(d.plan.micro_indices(consumed, m)) for m in range(2) for d in pair]
        assert sorted(map(str, one)) == sorted(map(str, two))
    late = data(BatchPlan(2, 4, 1))  # a resumed run packs the windows before its position on first use
    assert late.rows(np.arange(300, 308)) == single.rows(np.arange(300, 308))
    plan = single.packing
    rows = plan.rows(np.arange(plan.row_ends[-1]))
    lengths = src[0].lengths
    assert max(sum(int(lengths[j]) for _, j in row) for row in rows) <= ROW
    # each window's examples are the global order's, each exactly once
    first = [p for row in rows[: plan.row_ends[1]] for p in row]
    assert sorted(first) == sorted(single.picks(np.arange(64)))


def test_a_resumed_plan_starts_at_its_cursor_and_rows_come_in_no_length_order(chat_shards):
    src = [ExampleSource(chat_shards["sft"], ROW, 0.05, "sft", group=1, packed=True)]
    full = ExampleBatches(src, [1.0], 7, BatchPlan(2, 1, 1), 1024, pad_id=0, seq_len=ROW, pack_window=128).packing
    expected = full.rows(np.arange(200, 260))
    cursor = full.cursor(200)
    resumed = ExampleBatches(src, [1.0], 7, BatchPlan(2, 1, 1), 1024, pad_id=0, seq_len=ROW, pack_window=128).packing
    resumed.start_at(cursor)
    assert cursor[0] > 0 and resumed.rows(np.arange(200, 260)) == expected
    assert resumed.row_ends[0] == cursor[1] and len(resumed.row_ends) < len(full.row_ends)  # nothing packed before
    with pytest.raises(ValueError):
        resumed.rows([cursor[1] - 1])
    # best fit opens rows longest first; the rows of a window then come in a keyed order, not that one
    for w in range(3):
        counts = [len(row) for row in full._windows(w)]
        assert abs(np.corrcoef(np.arange(len(counts)), counts)[0, 1]) < 0.3


def test_an_example_longer_than_a_row_is_left_out_and_counted(chat_shards):
    for kind, group, seq_len in (("sft", 1, 40), ("dpo", 2, 55)):
        padded = ExampleSource(chat_shards[kind], seq_len, 0.0, kind, group)
        packed = ExampleSource(chat_shards[kind], seq_len, 0.0, kind, group, packed=True)
        positions = padded.doc_ends - padded.doc_starts - 1
        assert padded.too_long == int((positions.max(axis=1) > seq_len).sum()) > 0
        assert packed.too_long == int((positions.sum(axis=1) > seq_len).sum())  # a pair shares one row
        assert (packed.lengths <= seq_len).all() and len(packed.lengths) == packed.n_train + packed.n_val
        if group == 1:
            assert packed.too_long == padded.too_long


# -------------------------------------------------------------------------------------- same losses as padding

def _sft_batches(chat_shards, picks):
    src = [ExampleSource(chat_shards["sft"], ROW, 0.05, "sft", group=1, packed=True)]
    data = ExampleBatches(src, [1.0], 0, BatchPlan(4, 1, 1), 1024, pad_id=0, seq_len=ROW, pack_window=64)
    padded = ExampleBatches(src, [1.0], 0, BatchPlan(4, 1, 1), 1024, pad_id=0, seq_len=ROW)
    rows = [[picks[i] for i in row] for row in best_fit(src[0].lengths[[j for _, j in picks]], ROW)]
    order = [p for row in rows for p in row]
    assert max(len(row) for row in rows) >= 3  # really packed
    return padded.collate([[p] for p in order]), data.collate(rows)


def assert_same_gradients(a: dict, b: dict) -> None:
    """Within 1e-5 relative, per parameter tensor (its norm): elements near zero differ in their last fp32 bits."""
    for name in b:
        assert (a[name] - b[name]).norm() <= 1e-5 * b[name].norm(), name
        assert b[name].norm() > 0, name


def _gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_and_padded_sft_give_the_same_per_example_losses_and_gradients(chat_shards):
    padded, packed = _sft_batches(chat_shards, [(0, j) for j in range(3, 40, 3)])
    assert packed.inputs.numel() < padded.inputs.numel() and len(packed.inputs) < len(padded.inputs) / 2
    assert packed.real_tokens == padded.real_tokens
    model = tiny_model()
    per_padded = sequence_logps(model, padded)
    per_packed = sequence_logps(model, packed, len(per_padded))
    torch.testing.assert_close(per_packed, per_padded, rtol=1e-5, atol=0)
    g_padded = _gradients(model, next_token_loss(model, padded)[0])
    g_packed = _gradients(model, next_token_loss(model, packed)[0])
    assert_same_gradients(g_packed, g_padded)


def test_packed_and_padded_dpo_give_the_same_per_pair_losses_and_gradients(chat_shards):
    src = [ExampleSource(chat_shards["dpo"], 2 * ROW, 0.05, "dpo", group=2, packed=True)]
    reference = LiveReference(tiny_model(seed=1).eval(), torch.device("cpu"), torch.autocast("cpu", enabled=False),
                              DPO.reference_columns)
    common = dict(pad_id=0, seq_len=2 * ROW)
    packing = PairBatches(src, [1.0], 0, BatchPlan(4, 1, 1), 1024, pack_window=64, **common)
    padding = PairBatches(src, [1.0], 0, BatchPlan(4, 1, 1), 1024, **common)
    picks = [(0, j) for j in range(0, 24, 2)]
    rows = [[picks[i] for i in row] for row in best_fit(src[0].lengths[[j for _, j in picks]], 2 * ROW)]
    assert max(len(row) for row in rows) >= 2
    packed = packing.collate(rows)
    padded = padding.collate([[p] for row in rows for p in row])
    for batch in (packed, padded):  # what the stage's prepare() does before the losses
        batch.reference = reference(batch)
    torch.testing.assert_close(packed.reference, padded.reference, rtol=1e-5, atol=0)
    model = tiny_model()
    n = len(picks)

    def pair_losses(batch, name):  # every loss: the length-normalised ones also count each sequence's tokens
        logps = sequence_logps(model, batch, 2 * n)
        tokens = sequence_tokens(batch.targets, batch.segments, 2 * n)
        return preference_loss(name, logps[:n], logps[n:], batch.reference[:n], batch.reference[n:], beta=0.5,
                               chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])[0]

    # a loss linear in the log-ratios (hinge) carries the last float32 step of log-probs of ~100 (7.6e-6) into its
    # value as it is: compared at 1e-6 of the log-probs' scale, where a wrong layout would be off by whole nats
    with torch.no_grad():
        scale = float(sequence_logps(model, padded).abs().max())
    for name in PREFERENCE_LOSSES:
        l_padded, l_packed = pair_losses(padded, name), pair_losses(packed, name)
        assert l_padded.std() > 1e-3, name  # the reference differs from the policy: the losses are not all ln 2
        torch.testing.assert_close(l_packed, l_padded, rtol=1e-5, atol=1e-6 * scale, msg=name)
    g_padded = _gradients(model, pair_losses(padded, "sigmoid").sum())
    g_packed = _gradients(model, pair_losses(packed, "sigmoid").sum())
    assert_same_gradients(g_packed, g_padded)


def test_no_packed_example_attends_to_another(chat_shards):
    _, packed = _sft_batches(chat_shards, [(0, j) for j in range(3, 40, 3)])
    model = tiny_model().eval()
    row = int(np.argmax([len(set(r.tolist()) - {-1}) for r in packed.segments]))
    victim = int(packed.segments[row, 0])
    changed = packed.inputs.clone()
    at = packed.segments == victim
    changed[at] = (changed[at] + 17) % 1000
    with torch.no_grad():
        before = model(packed.inputs, segments=packed.segments)
        after = model(changed, segments=packed.segments)
        unmasked = model(changed)  # the same rows without the document mask: the change reaches the others
    others = (packed.segments != victim) & (packed.segments >= 0)
    assert torch.equal(before[others], after[others])
    assert not torch.equal(before[at], after[at])
    assert not torch.equal(model(packed.inputs)[others], unmasked[others])


def test_flex_attention_gives_the_boolean_mask_result(chat_shards, monkeypatch):
    """FlexAttention has no backward on CPU (torch 2.13): its forward is compared here, training uses it on CUDA.
    Our part is the mask (which positions of a packed row see which); FlexAttention runs here uncompiled, its
    reference path, which computes what its kernels do (compiled for the CPU, it took a minute of the suite; the
    compiled kernels run in bench/gpu.py on a GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from training.models import transformer

    monkeypatch.setattr(transformer, "flex_attention", lambda: flex_attention)
    monkeypatch.setattr(transformer, "flex_block_mask", lambda: create_block_mask)
    _, packed = _sft_batches(chat_shards, [(0, j) for j in range(3, 40, 3)])
    model = tiny_model().eval()
    with torch.no_grad():
        sdpa = model(packed.inputs, segments=packed.segments)
        model.attention_impl = "flex"
        flex = model(packed.inputs, segments=packed.segments)
    real = packed.segments >= 0
    torch.testing.assert_close(flex[real], sdpa[real], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ document-masked pretraining

@pytest.fixture(scope="module")
def short_documents(tmp_path_factory, tokenizer_model) -> str:
    """Shards of many short documents (speeches), so that samples of 32 tokens hold several."""
    from preprocess.__main__ import main as preprocess_main

    out = tmp_path_factory.mktemp("short-docs")
    text = open(shakespeare_plays()[0], encoding="utf-8").read()
    docs = [p.strip() for p in text.split("\n\n") if p.strip()][:1500] + MIXED_TEXTS
    src = write_jsonl(out / "docs.jsonl", [{"text": d} for d in docs])
    assert preprocess_main(["shards", "--input", src, "--tokenizer", tokenizer_model, "--out", str(out / "shards"),
                            "--unit-mb", "0.05"]) == 0
    return str(out / "shards")


def test_document_ids_of_a_sample_follow_the_shard_offsets(short_documents):
    src = ShardSource(short_documents, 32, 0.05, "pretrain")
    starts, ends = src.document_bounds()
    assert len(src.shards) > 1
    for j in range(src.n_train):
        positions = j * 32 + np.arange(32)
        expected = np.searchsorted(ends, positions, side="right")
        assert np.array_equal(src.documents(j), expected - expected[0]), j


def test_a_document_in_a_sample_never_sees_another_and_one_document_is_todays_path(short_documents):
    src = ShardSource(short_documents, 32, 0.05, "pretrain")
    plan = BatchPlan(4, 1, 1)
    masked = PretrainData([src], [1.0], 0, plan, 1024, document_mask=True)
    plain = PretrainData([src], [1.0], 0, plan, 1024)
    several = [j for j in range(src.n_train) if src.documents(j)[-1] >= 1][:4]
    batch = masked.collate([[(0, j)] for j in several])
    assert batch.segments is not None
    first = batch.segments == 0  # document A of each row (it started before or at the sample)
    changed = batch.inputs.clone()
    changed[first] = (changed[first] + 5) % 1000
    model = tiny_model().eval()
    with torch.no_grad():
        before = model(batch.inputs, segments=batch.segments)
        after = model(changed, segments=batch.segments)
        unmasked_before, unmasked_after = model(batch.inputs), model(changed)
    assert torch.equal(before[~first], after[~first])
    assert not torch.equal(unmasked_before[~first], unmasked_after[~first])
    # B alone in a row of its own computes as it does inside the sample
    row = 0
    b = batch.segments[row] == 1
    with torch.no_grad():
        alone = model(batch.inputs[row][b].unsqueeze(0))
    torch.testing.assert_close(before[row][b], alone[0], rtol=1e-5, atol=1e-5)

    one_doc = [j for j in range(src.n_train) if src.documents(j)[-1] == 0][:4]
    a, b = masked.collate([[(0, j)] for j in one_doc]), plain.collate([[(0, j)] for j in one_doc])
    assert a.segments is None and torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    with torch.no_grad():
        torch.testing.assert_close(model(a.inputs, segments=torch.zeros_like(a.inputs)), model(a.inputs),
                                   rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def long_context_sft(tmp_path_factory, pretrain_shards, chat_shards) -> str:
    """A pretrained then fine-tuned tiny model with a context of 256 (the session's sft_run has 64)."""
    out = tmp_path_factory.mktemp("long-context")
    run_training(f"data.path={pretrain_shards}", "train.max_steps=2", "model.max_seq_len=256",
                 f"out_dir={out / 'pretrain'}")
    run_training(f"data.path={chat_shards['sft']}", f"init_from={out / 'pretrain'}", "train.max_steps=2",
                 f"out_dir={out / 'sft'}", *CHAT, stage="sft", config=SFT_CONFIG)
    return str(out / "sft")


@pytest.mark.slow
def test_packed_sft_is_the_same_on_two_processes_and_resumes_exactly_after_kill_9(chat_shards, long_context_sft,
                                                                                  tmp_path):
    # windows of 16 conversations make ~5 rows: the checkpoint of step 3 (24 rows) lies in a later window
    common = [f"data.path={chat_shards['sft']}", f"init_from={long_context_sft}", "train.max_steps=6",
              "train.eval_every=3", "train.ckpt_every=3", "data.read_ahead=true", "data.pack_window=16", *PACKED]
    run_training(*common, f"out_dir={tmp_path / 'one'}", "train.grad_accum=4", stage="sft", config=SFT_CONFIG)
    run_training(*common, f"out_dir={tmp_path / 'two'}", "train.grad_accum=2", nproc=2, stage="sft", config=SFT_CONFIG)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    for step, value in val_losses(tmp_path / "one").items():
        assert val_losses(tmp_path / "two")[step] == pytest.approx(value, rel=1e-5)
    # the batches read a step ahead (as on a GPU; here in all of this test's runs, the resumed ones too, while the
    # packing plan grows window by window, with an evaluation and a checkpoint between steps) are those read at each
    # step
    run_training(*common, f"out_dir={tmp_path / 'at-step'}", "train.grad_accum=4", "data.read_ahead=false",
                 stage="sft", config=SFT_CONFIG)
    assert losses(tmp_path / "at-step") == one and val_losses(tmp_path / "at-step") == val_losses(tmp_path / "one")

    out = tmp_path / "killed"
    command = start_training(*common, f"out_dir={out}", "train.grad_accum=4", stage="sft", config=SFT_CONFIG)
    kill_after_first_checkpoint(command, out)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"
    cursor = json.loads((out / "checkpoints" / "step-3" / "state.json").read_text())["packing_cursor"]
    assert cursor[0] > 0 and 0 < cursor[1] <= 24  # the resume starts packing there, not at window 0
    run_training(*common, f"out_dir={out}", "train.grad_accum=4", stage="sft", config=SFT_CONFIG)
    assert losses(out) == one and val_losses(out) == val_losses(tmp_path / "one")
    # the position counts packed rows: resuming without packing (or with another window) would misread it
    proc = run_training(*common, f"out_dir={out}", "train.max_steps=8", "data.packing=false", stage="sft",
                        config=SFT_CONFIG, expect=1)
    assert "data.packing" in proc.stderr and "Traceback" not in proc.stderr

    # padded, the same conversations take far more positions than packed with the default window
    short = [*common[:-len(PACKED) - 1], "train.max_steps=2", "train.grad_accum=4"]
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    run_training(*short, "train.micro_batch_size=6", f"out_dir={padded}", stage="sft", config=SFT_CONFIG)
    run_training(*short, *PACKED, f"out_dir={packed}", stage="sft", config=SFT_CONFIG)
    share = {run: np.mean(list(losses(run, "padding_share").values())) for run in (packed, padded)}
    assert share[packed] < min(0.1, share[padded]), share  # rows of 127 hold ~3 conversations of 24-63


@pytest.mark.slow
def test_packed_dpo_starts_at_ln2_and_is_the_same_on_two_processes(chat_shards, long_context_sft, tmp_path):
    common = [f"data.path={chat_shards['dpo']}", f"init_from={long_context_sft}", "train.max_steps=3",
              "train.eval_every=3", "train.eval_samples=8", "data.seq_len=255", "train.micro_batch_size=2",
              "data.packing=true", "model.max_seq_len=256"]
    run_training(*common, f"out_dir={tmp_path / 'one'}", "train.grad_accum=2", stage="dpo", config=DPO_CONFIG)
    proc = run_training(*common, f"out_dir={tmp_path / 'two'}", nproc=2, stage="dpo", config=DPO_CONFIG)
    assert losses(tmp_path / "one")[1] == pytest.approx(math.log(2), abs=1e-6)
    assert losses(tmp_path / "one", "rewards/margins")[1] == 0
    for key in ("loss", "logps/chosen", "logps/rejected"):
        one, two = losses(tmp_path / "one", key), losses(tmp_path / "two", key)
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (key, step)
    assert "do not fit" not in proc.stdout  # every test pair fits 255 positions
    # the reference precomputed (in padded rows) gives the same start; in rows of 63 most pairs do not fit
    shards = private_copy(chat_shards["dpo"], tmp_path / "dpo-shards")  # the cache goes next to the shards
    pre = run_training(*common, f"data.path={shards}", "data.seq_len=63", f"out_dir={tmp_path / 'pre'}",
                       "dpo.precompute_ref=true",
                       "train.max_steps=1", "train.grad_accum=2", stage="dpo", config=DPO_CONFIG)
    assert "reference log-probs of" in pre.stdout
    assert "do not fit data.seq_len=63 positions (a packed pair shares one row) and are left out" in pre.stdout
    assert losses(tmp_path / "pre")[1] == pytest.approx(math.log(2), abs=1e-5)


# ------------------------------------------------------------------------------- validation per source, bpb

def test_token_bytes_add_up_to_the_utf8_bytes_of_real_text(tokenizer_model):
    import sentencepiece as spm

    from preprocess.tokenizer import token_bytes

    sizes = token_bytes(tokenizer_model)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    texts = [*MIXED_TEXTS, open(shakespeare_plays()[1], encoding="utf-8").read()[:20000], "tab\tand\nnewline  two"]
    tang = os.path.join(REPO, "..", "shared", "data", "tang_poems")
    if os.path.isdir(tang):  # Chinese through byte fallback, where the shared corpora are present
        for root, _, files in os.walk(tang):
            texts += [open(os.path.join(root, f), encoding="utf-8").read()[:5000] for f in sorted(files)[:3]
                      if f.endswith((".json", ".txt"))]
            break
    for text in texts:
        ids = sp.encode(text)
        assert int(sizes[ids].sum()) == len(text.encode("utf-8")), text[:40]
    assert sizes[sp.eos_id()] == 0


@pytest.mark.slow
def test_validation_per_source_and_bits_per_byte_against_a_hand_computation(pretrain_shards, short_documents,
                                                                            tokenizer_model, tmp_path):
    import sentencepiece as spm

    common = ["train.max_steps=1", "train.eval_every=1", "train.eval_samples=100000", "data.val_fraction=0.02"]
    named = f"data.path={{plays: {{path: {pretrain_shards}, weight: 3}}, speeches: {{path: {short_documents}}}}}"
    run_training(*common, named, f"out_dir={tmp_path / 'both'}")
    run_training(*common, f"data.path={short_documents}", f"out_dir={tmp_path / 'speeches'}")
    first = json.loads(open(tmp_path / "both" / "metrics.jsonl").readline())
    alone = json.loads(open(tmp_path / "speeches" / "metrics.jsonl").readline())
    assert first["step"] == alone["step"] == 0
    assert {"val_loss", "val_loss/plays", "val_loss/speeches", "val_bpb", "val_bpb/plays"} <= set(first)
    # the same weights at step 0 (same seed), the same validation samples: the source's share is its own run's
    assert first["val_loss/speeches"] == pytest.approx(alone["val_loss"], rel=1e-6)
    assert min(first["val_loss/plays"], first["val_loss/speeches"]) < first["val_loss"] < \
        max(first["val_loss/plays"], first["val_loss/speeches"])

    # bits per byte by hand: the targets of the validation samples tile one stretch of the token stream; its text,
    # decoded in one piece (a sample alone may begin or end inside a character's bytes), in UTF-8
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    src = ShardSource(short_documents, 32, 0.02, "pretrain")
    targets = src.n_val * 32
    size = len(sp.decode(src.read(src.n_train * 32 + 1, targets).tolist()).encode("utf-8"))
    assert alone["val_bpb"] == pytest.approx(alone["val_loss"] * targets / math.log(2) / size, rel=1e-3)


def test_a_named_source_needs_a_path(tmp_path):
    from preprocess.errors import UserError
    from training.config import DataConfig, data_sources, source_names

    with pytest.raises(UserError, match=r"data.path.web: expected \{path"):
        data_sources(DataConfig(path={"web": {"weight": 2}}))
    assert source_names(["data/a/shards", "data/b/shards", "x/c"]) == ["a/shards", "b/shards", "c"]
    assert [n for n, _, _ in data_sources(DataConfig(path={"web": {"path": "w"}, "code": {"path": "c", "weight": 3}}))] \
        == ["web", "code"]


def test_describe_says_how_many_examples_a_packed_row_holds(chat_shards):
    proc = run_command("-m", "training.describe", "--config", SFT_CONFIG, "init_from=null",
                       f"data.path={chat_shards['sft']}", f"data.seq_len={ROW}", "model.max_seq_len=128",
                       "data.packing=true", "data.pack_window=128")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("packing:"))
    per_row = float(line.split()[1])
    assert 2 < per_row < 5 and f"batch: 16 rows (≤ {ROW} tokens each) per micro-step" in proc.stdout


def test_packing_and_document_mask_are_refused_where_they_mean_nothing(pretrain_shards, chat_shards, sft_run, tmp_path):
    proc = run_training(f"data.path={pretrain_shards}", "data.packing=true", f"out_dir={tmp_path / 'a'}", expect=1)
    assert "data.document_mask=true" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_training(f"data.path={chat_shards['sft']}", f"init_from={sft_run}", "data.document_mask=true",
                        f"out_dir={tmp_path / 'b'}", *CHAT, stage="sft", config=SFT_CONFIG, expect=1)
    assert "data.document_mask is for pretraining" in proc.stderr
    proc = run_training(f"data.path={pretrain_shards}", "train.attention=flex", "data.document_mask=true",
                        f"out_dir={tmp_path / 'c'}", expect=1)
    assert "no backward pass on CPU" in proc.stderr and "Traceback" not in proc.stderr
