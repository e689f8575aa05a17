import ast
import glob
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, REPO, TINY_CONFIG, free_port, kill_after_first_checkpoint, losses, run_training, val_losses, write_jsonl
from hooked_run import CompiledCalls

from preprocess.__main__ import main as preprocess_main
from preprocess.errors import UserError
from training.config import Config, TrainConfig, load_config
from training.data.batch import Batch
from training.data.order import BatchPlan, KeyedPermutation, SampleOrder
from training.data.sources import ShardSource
from training.models.decoding import generate
from training.models.optim import lr_at
from training.models.transformer import KVCache, ModelConfig, MoEConfig, Transformer
from training.parallel import env as D
from training.parallel.ddp import DDP
from training.run.loop import accumulate, global_counts
from training.stages.base import Stage
from training.stages.losses import IGNORE
from training.stages.pretrain import PretrainData

# ------------------------------------------------------------------------------------------- configs


def test_every_shipped_config_loads_and_builds():
    expected_params = {"tiny": (1e6, 5e6), "125m": (100e6, 160e6), "350m": (300e6, 420e6), "1b": (0.9e9, 1.4e9)}
    configs = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_config(path)
        name = os.path.basename(path).removesuffix(".yaml")
        if name in expected_params:
            with torch.device("meta"):
                model = Transformer(ModelConfig(**{**vars(cfg.model), "vocab_size": 32000 if name != "tiny" else 4032}))
            low, high = expected_params[name]
            assert low <= model.num_params() <= high, (name, model.num_params())


def test_config_mistakes_are_one_line_errors_naming_the_key(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'train\.max_step'"):
        load_config(TINY_CONFIG, ["train.max_step=5"])
    with pytest.raises(UserError, match=r"train\.lr: Value 'fast' .*could not be converted"):
        load_config(TINY_CONFIG, ["train.lr=fast"])
    with pytest.raises(UserError, match=r"data\.seq_len: 512 is longer than model\.max_seq_len=256"):
        load_config(TINY_CONFIG, ["data.seq_len=512"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  warmup: 3\n")
    with pytest.raises(UserError, match=rf"{bad}: unknown key 'train\.warmup'"):
        load_config(str(bad))
    proc = subprocess.run([sys.executable, "-m", "training.pretrain", "--config", TINY_CONFIG, "dist.backend=nccl"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr == f"error: {TINY_CONFIG} with overrides: dist.backend: 'nccl' is not one of none, ddp, deepspeed, fsdp2\n"


def test_the_model_file_knows_nothing_of_distribution():
    tree = ast.parse(open(os.path.join(REPO, "training", "models", "transformer.py")).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith("torch.distributed") for m in imported)


def test_ranks_come_from_torchrun_slurm_or_mpi_variables():
    assert D.ranks_from_env({}) == (0, 1, 0, "none")
    assert D.ranks_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1, "torchrun")
    assert D.ranks_from_env({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1"})[:3] == (5, 16, 1)
    assert D.ranks_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (0, 1, 0, "none")  # sbatch without srun
    assert D.ranks_from_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "0"})[:3] == (2, 4, 0)
    assert D.ranks_from_env({"PMI_RANK": "1", "PMI_SIZE": "2"})[:3] == (1, 2, 0)
    # torchrun inside an srun task wins over the task's own Slurm variables
    assert D.ranks_from_env({"RANK": "9", "WORLD_SIZE": "16", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"})[0] == 9


# --------------------------------------------------------------------------------------------- model


def test_kv_cache_decoding_matches_the_full_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=40)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 97, (2, 30))
    full = model(tokens)
    cache = KVCache(cfg, 2, 30, torch.device("cpu"), torch.float32)
    parts = [model(tokens[:, :12], cache)]  # a prompt, then one token at a time, then a chunk
    parts += [model(tokens[:, i:i + 1], cache) for i in range(12, 20)]
    parts.append(model(tokens[:, 20:], cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_logits_at_kept_positions_are_the_full_forwards_and_so_are_their_gradients():
    """keep= runs the output layer at some positions of packed rows (GRPO's targets): their logits, and the
    gradients of a loss on them, are the full forward's."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=40)
    model = Transformer(cfg)
    tokens = torch.randint(0, 97, (3, 30))
    segments = torch.tensor([[0] * 12 + [1] * 18, [2] * 30, [3] * 20 + [-1] * 10])
    keep = torch.rand(3, 30) < 0.4
    grads, outputs = [], []
    for kept in (model(tokens, segments=segments)[keep], model(tokens, segments=segments, keep=keep)):
        model.zero_grad()
        kept.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        outputs.append(kept.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for full, kept in zip(*grads, strict=True):
        torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: summed cross-entropy of whole fp32 logits over the targets != IGNORE, and their count."""
    loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_target_log_probs_in_chunks_are_the_log_softmax_of_the_whole_logits(monkeypatch, autocast):
    """The output layer given targets (models/output.py) computes log p(target) a chunk of rows at a time: per
    row (at a temperature, with IGNORE targets and at kept positions) and summed (its gradient made in the forward),
    values and gradients equal those of F.log_softmax / F.cross_entropy over the whole logits. Chunks of 7 rows:
    several per micro-batch, the last one short. Under bf16 autocast both compute their matmuls in bf16 and differ
    only by where they round."""
    monkeypatch.setattr("training.models.output.CHUNK_LOGIT_BYTES", 7 * 4 * 97)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=40))
    tokens = torch.randint(0, 97, (3, 30))
    targets = torch.randint(0, 97, (3, 30)).masked_fill(torch.rand(3, 30) < 0.3, IGNORE)
    segments = torch.tensor([[0] * 12 + [1] * 18, [2] * 30, [3] * 20 + [-1] * 10])
    keep = targets != IGNORE
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

    def assert_near(got, want, name):  # bf16: within 2% of the tensor's size, each gradient however small it is
        if autocast:
            assert (got - want).norm() <= 2e-2 * want.norm(), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)

    def run(loss_of):
        model.zero_grad()
        with context:
            value = loss_of()
        (value if value.dim() == 0 else value.square().mean()).backward()
        return value.detach(), [p.grad.clone() for p in model.parameters()]

    def whole(temperature=1.0):
        logits = model(tokens, segments=segments).float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep

    cases = {
        "per row": (lambda: whole(), lambda: model(tokens, segments=segments, targets=targets)),
        "temperature": (lambda: whole(0.7), lambda: model(tokens, segments=segments, targets=targets, temperature=0.7)),
        "kept rows": (lambda: whole(0.7)[keep], lambda: model(tokens, segments=segments, keep=keep,
                                                               targets=targets[keep], temperature=0.7)),
        "summed": (lambda: -lm_loss_sum(model(tokens, segments=segments), targets)[0],
                   lambda: model(tokens, segments=segments, targets=targets, summed=True)),
    }
    for name, (reference, chunked) in cases.items():
        (want, want_grads), (got, got_grads) = run(reference), run(chunked)
        assert got.dtype == torch.float32, name
        assert_near(got, want, name)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert_near(g, w, name)
    assert (model(tokens, segments=segments, targets=targets)[~keep] == 0).all()


def test_packed_rows_with_grouped_heads_train_alike_compiled_and_eager():
    """Packed rows give attention a mask, which the CPU's kernels take with grouped key/value heads as they are
    (no copies); train.compile must trace that to the same logits and gradients. aot_eager traces forward and
    backward as inductor does, without its code generation (minutes on a CPU)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=40))
    tokens = torch.randint(0, 97, (2, 24))
    segments = torch.tensor([[0] * 10 + [1] * 14, [2] * 20 + [-1] * 4])
    grads, outputs = [], []
    try:
        for forward in (model, torch.compile(model, backend="aot_eager")):
            model.zero_grad()
            out = forward(tokens, segments=segments)
            out.square().mean().backward()
            outputs.append(out.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for compiled, eager in zip(grads[1], grads[0], strict=True):
        assert torch.isfinite(compiled).all()
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_the_whole_model_compiles_with_its_loss_into_one_graph_and_trains_alike(monkeypatch):
    """train.compile_scope=model (auto under DDP) compiles the training forward with its loss: packed rows with
    grouped heads, and the output layer's chunked log-probs (summed, as pretraining and SFT take them, and per
    position, as DPO, KTO and GRPO do) make one graph without a break, whose loss and gradients are eager's.
    Several chunks per micro-batch (7 rows each)."""
    monkeypatch.setattr("training.models.output.CHUNK_LOGIT_BYTES", 7 * 4 * 97)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=40))
    tokens = torch.randint(0, 97, (2, 25))
    segments = torch.tensor([[0] * 10 + [1] * 14, [2] * 20 + [-1] * 4])
    targets = tokens[:, 1:].masked_fill(segments < 0, IGNORE)
    try:
        for summed in (True, False):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(tokens[:, :-1], segments=segments, targets=targets, summed=summed)
            assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
            results = []
            for forward in (model, torch.compile(model, backend="aot_eager")):
                model.zero_grad()
                out = forward(tokens[:, :-1], segments=segments, targets=targets, summed=summed)
                (out if summed else out.square().sum()).backward()
                results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
            (eager, eager_grads), (compiled, compiled_grads) = results
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
            for c, e in zip(compiled_grads, eager_grads, strict=True):
                torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_train_compile_takes_the_whole_model_under_ddp_and_each_block_under_deepspeed_and_fsdp2():
    from training.parallel.backends import backend_class
    from training.run.build import compile_scope

    def cfg(*overrides):
        return load_config(TINY_CONFIG, ["data.path=unused", *overrides])

    ddp, deepspeed = backend_class("ddp"), backend_class("deepspeed")
    assert compile_scope(cfg("train.compile=true"), ddp) == "model"
    assert compile_scope(cfg("train.compile=true"), deepspeed) == "blocks"
    assert compile_scope(cfg("train.compile=true", "train.compile_scope=blocks"), ddp) == "blocks"
    assert compile_scope(cfg("train.compile=false", "train.compile_scope=model"), ddp) is None
    assert deepspeed.check(cfg("train.compile=true", "train.compile_scope=model"))[0].startswith(
        "train.compile_scope=model: DeepSpeed")
    fsdp2 = backend_class("fsdp2")
    assert compile_scope(cfg("train.compile=true"), fsdp2) == "blocks"
    assert fsdp2.check(cfg("train.compile=true", "train.compile_scope=model"))[0].startswith(
        "train.compile_scope=model: FSDP2")
    backend = DDP(None, D.DistEnv(), None, "fp32")
    backend.setup(_small_model(), lambda m: None)
    backend.compile()  # the training forwards through a compiled wrapper; evaluation and sampling keep the model
    assert isinstance(backend.train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert backend.train_model._orig_mod is backend.model


@pytest.mark.parametrize("blocks", ["dense", "checkpointed dense, moe"])
def test_compiled_blocks_stay_compiled_for_training_after_sampling_and_decode_eagerly(blocks):
    """train.compile per block (DeepSpeed's and FSDP2's scope) in a run that samples before its first step, as
    every shipped config does at step 0: decoding 12 tokens with the KV cache must not enter the compiled code,
    whose one code object (shared by every block) it would recompile per position until dynamo's limit (8), after
    which the training forward, never compiled yet, would run eager. Then training (a mixture-of-experts block
    beside a dense one whose activations are recomputed in the backward) and evaluation run compiled, with eager's logits,
    routers' losses and gradients. aot_eager traces as inductor does, without its code generation; each call of a
    compiled graph is counted (tests/hooked_run.py)."""
    moe = MoEConfig(experts=4, every=2) if blocks != "dense" else MoEConfig()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=40,
                                    moe=moe))
    # the dense block's activations recomputed (a mixture-of-experts block's routing, kept for its losses, is a
    # side effect that compile leaves to eager inside a checkpoint: not what is checked here)
    model.checkpoint_activations("every_n" if moe.experts else "none", 2)
    tokens = torch.randint(0, 97, (2, 16))
    results = []
    for compiled in (False, True):
        model.zero_grad()
        model.choose_expert_matmul("cpu", torch.float32, compiled)
        counted = CompiledCalls(None)
        if compiled:
            model.compile_blocks(backend=counted.backend)
        decoded = generate(model, [5, 6, 7], 12, greedy=True)
        assert not counted.calls  # decoding: eager
        out = model(tokens)
        aux = model.auxiliary_losses()
        (out.square().mean() + (aux.loss if aux else 0)).backward()
        training_calls = sum(counted.calls.values())
        with torch.no_grad():
            evaluated = model(tokens[:1])
        results.append((decoded, out.detach(), aux and aux.loss.detach(), evaluated,
                        [p.grad.clone() for p in model.parameters()]))
        if compiled:
            assert training_calls >= 2 and sum(counted.calls.values()) > training_calls, counted.calls
    torch._dynamo.reset()
    (decoded, out, aux, evaluated, grads), eager = results[1], results[0]
    assert decoded == eager[0] and (aux is None) == (eager[2] is None) and (aux is None) == (blocks == "dense")
    for ours, theirs in zip([out, evaluated, *([aux] if aux is not None else []), *grads],
                            [eager[1], eager[3], *([eager[2]] if aux is not None else []), *eager[4]], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_async_checkpoint_is_refused_in_one_line_where_the_backend_saves_only_between_steps():
    from training.run.build import check
    from training.stages.pretrain import Pretrain

    for backend in ("ddp", "deepspeed"):
        cfg = load_config(TINY_CONFIG, ["data.path=unused", f"dist.backend={backend}", "train.async_checkpoint=true"])
        with pytest.raises(UserError, match=f"^train.async_checkpoint=true: dist.backend={backend} writes"):
            check(Pretrain(cfg), cfg)
    cfg = load_config(TINY_CONFIG, ["data.path=unused", "dist.backend=fsdp2", "train.async_checkpoint=true"])
    check(Pretrain(cfg), cfg)


def test_a_resume_forgets_metrics_lines_cut_short_by_a_full_disk_or_a_kill(tmp_path):
    from training.run.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 2, "time/checkpoint": 0.1}\n'
                    '{"step": 3, "loss": 1.8}\n{"step": 2, "lo{"step": 2, "loss": 1.7}\n{"step": 1, "loss": 1.7}')
    MetricsLog.truncate(str(path), 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 2, "time/checkpoint": 0.1}\n'


def test_read_ahead_pins_what_every_stage_reads_for_a_gpu(monkeypatch):
    """For a GPU the reader pins each micro-batch's tensors, whatever the stage's batch: a Batch, KTO's labelled
    batch with the KL rows it holds, GRPO's prompts (no tensor: as they are). Without a GPU, pin_memory is a stub
    that records what it pinned; the device is only named."""
    from training.run.reader import StepReader
    from training.stages.grpo import Prompts
    from training.stages.kto import LabelledBatch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())

    def rows(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 50, (2, 8), generator=g), torch.randint(0, 50, (2, 8), generator=g)

    batches = [Batch(*rows(0)), LabelledBatch(*rows(1), counted=torch.ones(2), labels=torch.ones(2),
                                                kl_rows=Batch(*rows(2))), Prompts([])]

    class Data:
        def micro_batch(self, consumed, micro):
            return [(0, micro)], batches[micro]

    reader = StepReader(Data(), len(batches), torch.device("cuda"), ahead=True)
    reader.read_ahead(0)
    read = [batch for _, batch in reader.read(0)]
    reader.close()
    assert len(pinned) == 2 + 4 + 2  # inputs and targets; those, counted and labels; the KL rows' two
    for before, after in zip(batches[:2], read[:2], strict=True):
        assert type(after) is type(before) and after.inputs is not before.inputs
        assert torch.equal(after.inputs, before.inputs) and torch.equal(after.targets, before.targets)
    assert read[1].kl_rows.inputs is not batches[1].kl_rows.inputs and read[2] is batches[2]


def test_learning_rate_schedules():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.5)
    assert lr_at(54, wsd) == 1.0 and lr_at(55, wsd) == 1.0 and lr_at(110, wsd) == pytest.approx(0.0)
    assert lr_at(82, wsd) == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------------------------------------- data


def test_keyed_permutation_is_a_bijection_and_depends_on_the_key():
    for n in (1, 2, 5, 64, 1000, 4099):
        out = KeyedPermutation(n, (7,))(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))
    a, b = KeyedPermutation(1000, (1,))(np.arange(1000)), KeyedPermutation(1000, (2,))(np.arange(1000))
    assert (a != b).mean() > 0.9
    big = KeyedPermutation(10**12, (3,))(np.arange(10**6, 10**6 + 1000))
    assert len(set(big.tolist())) == 1000 and big.max() < 10**12


def test_mixing_follows_the_weights_and_reshuffles_each_epoch():
    order = SampleOrder([30, 7], [0.75, 0.25], seed=5)
    source, sample = order(np.arange(4000))
    assert abs((source == 0).mean() - 0.75) < 0.002
    first = sample[source == 1][:7].tolist()
    second = sample[source == 1][7:14].tolist()
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    again = order(np.arange(1234, 1300))
    assert (again[0] == source[1234:1300]).all() and (again[1] == sample[1234:1300]).all()


def test_ranks_and_micro_steps_partition_each_global_batch(pretrain_shards):
    single = BatchPlan(4, 4, world=1)
    pair = [BatchPlan(4, 2, world=2, rank=r) for r in (0, 1)]
    for consumed in (0, 48):
        one = sorted(i for m in range(4) for i in single.micro_indices(consumed, m))
        two = sorted(i for p in pair for m in range(2) for i in p.micro_indices(consumed, m))
        assert one == two == list(range(consumed, consumed + 16))
    data = PretrainData([ShardSource(pretrain_shards, 32, 0.05, "pretrain")], [1.0], 0, single, vocab_size=1024)
    _, batch = data.micro_batch(0, 0)
    x, y = batch.inputs, batch.targets
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_every_rank_evaluates_in_as_many_forwards_and_the_subset_does_not_depend_on_them(pretrain_shards):
    """17 validation entries, micro-batch 8: 2 batches on rank 0 and 1 (+ a filler that counts no target) on
    rank 1 of 2; the union is the one-process subset."""
    src = [ShardSource(pretrain_shards, 32, 0.2, "pretrain")]
    one = PretrainData(src, [1.0], 0, BatchPlan(8, 1, 1), vocab_size=1024)
    two = [PretrainData(src, [1.0], 0, BatchPlan(8, 1, 2, r), vocab_size=1024) for r in (0, 1)]
    batches = [[b for _, b in d.val_batches(17)] for d in two]
    assert [len(b) for b in batches] == [2, 2]
    counted = [[int((b.targets != IGNORE).sum()) for b in bs] for bs in batches]
    assert counted == [[8 * 32, 1 * 32], [8 * 32, 0]]
    rows = lambda bs: sorted(tuple(b.inputs[i].tolist()) for b in bs for i in range(len(b.inputs))
                             if (b.targets[i] != IGNORE).any())
    assert rows(batches[0] + batches[1]) == rows([b for _, b in one.val_batches(17)])


def test_describe_gives_the_global_batch_of_the_plan(pretrain_shards):
    proc = subprocess.run([sys.executable, "-m", "training.describe", "--config", TINY_CONFIG, "--processes", "4",
                           f"data.path={pretrain_shards}", "train.grad_accum=2"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "WORLD_SIZE": "3", "RANK": "0"})
    assert proc.returncode == 0, proc.stderr
    assert ("batch: 16 samples (≤ 128 tokens each) per micro-step x 2 micro-steps x 4 processes = 128 samples per "
            "optimizer step") in proc.stdout
    state = next(line for line in proc.stdout.splitlines() if line.startswith("state per rank on 4 processes"))
    assert "ddp " in state and "(this run)" in state.split("; ")[0] and "deepspeed ZeRO-3" in state and "fsdp2" in state
    from training.config import Config
    from training.parallel.backends import BACKENDS

    cfg, n = Config(), 4  # 1,000 weights, 600 trained, 4,800 bytes of optimizer state (AdamW's two moments)
    assert BACKENDS["ddp"].state_bytes(cfg, 1000, 600, 4800, n, "fp32") == (4000, 2400, 4800)  # whole everywhere
    assert BACKENDS["fsdp2"].state_bytes(cfg, 1000, 600, 4800, n, "bf16") == (1000, 600, 1200)  # fp32 shards
    cfg.dist.backend = "deepspeed"
    for stage, expected in ((0, (4000, 2400, 4800)), (1, (4000, 2400, 1200)), (2, (4000, 600, 1200)),
                            (3, (1000, 600, 1200))):
        cfg.dist.zero_stage = stage
        assert BACKENDS["deepspeed"].state_bytes(cfg, 1000, 600, 4800, n, "fp32") == expected, stage
    assert BACKENDS["deepspeed"].state_bytes(cfg, 1000, 600, 4800, n, "bf16") == (500, 300, 1800)  # + fp32 masters
    under_a_launcher = subprocess.run([sys.executable, "-m", "training.describe", "--config", TINY_CONFIG,
                                       f"data.path={pretrain_shards}"], capture_output=True, text=True, cwd=REPO,
                                      env={**os.environ, "WORLD_SIZE": "3", "RANK": "0"})
    assert "x 3 processes = 48 samples per optimizer step" in under_a_launcher.stdout


def test_validation_split_is_disjoint_from_training(pretrain_shards):
    src = ShardSource(pretrain_shards, 32, 0.1, "pretrain")
    data = PretrainData([src], [1.0], 0, BatchPlan(4, 1, 1), 1024)
    val_rows = {tuple(row.tolist()) for _, b in data.val_batches(400) for row in b.inputs}
    train_positions = set(data.order(np.arange(src.n_train))[1].tolist())
    assert train_positions == set(range(src.n_train)) and src.n_val > 0
    train_rows = {tuple(src.sample(j)[:-1].tolist()) for j in range(src.n_train)}
    assert len(val_rows) > 0 and not val_rows & train_rows


def test_shard_and_model_mismatches_are_refused(pretrain_shards, tmp_path, tokenizer_model):
    proc = run_training(f"data.path={pretrain_shards}", f"out_dir={tmp_path / 'r'}", "model.vocab_size=500",
                        "train.max_steps=1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: model.vocab_size=500 is smaller than the vocabulary of the tokenizer of "
                                   f"{pretrain_shards} (1000)")
    # a second directory tokenized with another tokenizer
    from preprocess.tokenizer import train_tokenizer

    train_tokenizer(["other words entirely, in another tokenizer\n" * 50], str(tmp_path / "tok2"), 300)
    src = write_jsonl(tmp_path / "o.jsonl", [{"text": "other words entirely " * 200}])
    preprocess_main(["shards", "--input", src, "--tokenizer", str(tmp_path / "tok2" / "tokenizer.model"),
                     "--out", str(tmp_path / "other")])
    proc = run_training(f"data.path=[{pretrain_shards},{tmp_path / 'other'}]", f"out_dir={tmp_path / 'r'}",
                        "train.max_steps=1", check=False)
    assert proc.returncode == 1 and "mixed sources need one tokenizer" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_out_of_range_token_ids_are_a_clear_error(pretrain_shards, tmp_path):
    import shutil

    from preprocess.fileio import file_sha256

    damaged = tmp_path / "damaged"
    shutil.copytree(pretrain_shards, damaged)
    manifest = json.load(open(damaged / "manifest.json"))
    shard = manifest["shards"][0]
    path = damaged / shard["files"]["tokens"]["path"]
    tokens = np.load(path)
    tokens[:] = 1500  # a consistent manifest, but ids the 1000-token model cannot embed
    np.save(path, tokens)
    shard["files"]["tokens"]["sha256"] = file_sha256(str(path))
    json.dump(manifest, open(damaged / "manifest.json", "w"))
    # the re-hash before a fresh run's first step finds them ...
    proc = run_training(f"data.path={damaged}", f"out_dir={tmp_path / 'r'}", "model.vocab_size=1024",
                        "train.max_steps=2", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {damaged}: shard-00000: token id 1500 is outside the vocabulary")
    # ... and without it, the read of a batch does
    proc = run_training(f"data.path={damaged}", f"out_dir={tmp_path / 'r'}", "model.vocab_size=1024",
                        "train.max_steps=2", "data.verify=false", check=False)
    assert proc.returncode == 1
    assert "error: token id 1500 at" in proc.stderr and "is outside the model's vocabulary (model.vocab_size=1024)" in proc.stderr


# ------------------------------------------------------------------------------- the loop, end to end


def _uneven_batches(rank: int) -> list[Batch]:
    """Two micro-batches per rank whose numbers of target tokens differ a lot (like SFT masks)."""
    g = torch.Generator().manual_seed(100 + rank)
    batches = []
    for keep in ((3, 16), (16, 1))[rank]:
        x = torch.randint(0, 50, (2, 16), generator=g)
        y = torch.randint(0, 50, (2, 16), generator=g)
        y[:, keep:] = IGNORE
        batches.append(Batch(x, y, real_tokens=x.numel()))
    return batches


class LMStage(Stage):
    """A loss over every target token, as pretraining and SFT have, without data."""
    name = data_kind = "lm"

    def loss(self, model, batch):
        return lm_loss_sum(model(batch.inputs), batch.targets)[0], {}


def _lm_stage() -> Stage:
    return LMStage(None)


def _backend(model, env) -> DDP:
    """The ddp backend (the bare model for one process) without an optimizer: the tests read the gradients."""
    backend = DDP(None, env, None, "fp32")
    backend.setup(model, lambda m: None)
    return backend


def _small_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, max_seq_len=16))


def _accumulate(stage, backend, batches, env):
    """One step's gradients, as the loop takes them: the global batch's counts first, then the micro-batches."""
    units, _, real, _ = global_counts(stage, batches, env, np.zeros(1))
    return accumulate(stage, backend, batches, env, units, real)


def _ddp_worker(rank: int, world: int, port: int, out: str, compiled: bool = False) -> None:
    """Rank `rank`'s micro-batches through the ddp backend (compiled whole: train.compile_scope=model, traced by
    aot_eager); rank 0 saves the gradients and how many buckets DDP reduced."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    env = D.DistEnv(rank, world, 0, torch.device("cpu"), "test")
    model = _small_model()
    backend = _backend(model, env)
    reductions = []

    def counted(state, bucket):
        reductions.append(bucket.index())
        return allreduce_hook(state, bucket)

    backend.ddp.register_comm_hook(None, counted)
    if compiled:
        backend.compile(backend="aot_eager")
    _accumulate(_lm_stage(), backend, _uneven_batches(rank), env)
    if rank == 0:
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "reductions": len(reductions)}, out)
    D.shutdown(env)
    D.exit_process(0)  # as the training commands end (see its docstring): no abort in gloo's teardown


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_step_that_does_not_log_reads_nothing_back_from_the_device(pretrain_shards, tmp_path, nproc):
    """Steps 1, 2, 4 and 5 of a run logging every 3 steps read no tensor value into Python (tests/hooked_run.py's
    HostReads counts what would wait for a GPU), on one process and on two: the loss, the gradient norm and
    whether the update was applied stay on the device until steps 3 and 6 read them back; the counts of a batch
    are the host's, summed over the processes on the host, as the stop-signal flags are. The optimizer is fused
    AdamW, as on a GPU, whose update skips a non-finite step by itself. Evaluation with its sample, TensorBoard
    and the progress output are on, as shipped: they run at the logged steps (3, 6), which may read."""
    run_training(f"data.path={pretrain_shards}", f"out_dir={tmp_path / 'run'}", "train.max_steps=6", "log.every=3",
                 "train.eval_every=3", "train.grad_accum=2", nproc=nproc, hooks=f"reads={tmp_path / 'reads'}")
    for rank in range(nproc):
        reads = {int(k): v for k, v in json.load(open(tmp_path / f"reads.rank-{rank}.json")).items()}
        assert all(not reads.get(step) for step in (1, 2, 4, 5)), (rank, reads)
        assert reads.get(3) and reads.get(6)  # the counter sees what a logged step reads
    assert sorted(losses(tmp_path / "run")) == [3, 6] and sorted(val_losses(tmp_path / "run")) == [0, 3, 6]


def test_float8_converts_the_blocks_projections_trains_keeps_the_checkpoint_format_and_is_refused_where_it_cannot_run(
        pretrain_shards, tmp_path, monkeypatch):
    """train.float8 swaps the dense blocks' projections for torchao's Float8Linear (not the output layer, the
    embedding, the norms, nor a MoE router), the state dict keeps its keys, and a step's loss and gradients stay
    near the unconverted model's (float8 rounds each matmul's inputs, its backward's to 2 mantissa bits: each
    gradient within 20% of its size). A run with it (the device check set aside: torchao's float8
    matmuls run on this CPU, slowly) trains with evaluation, its sample and activation checkpointing on, near the
    plain run's losses, and its checkpoint is plain weights. On a CPU, with LoRA and under DeepSpeed it is refused
    in one line."""
    pytest.importorskip("torchao", reason="the dev extra installs torchao")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    from training.checkpoint.weights import load_for_inference
    from training.cli import stage_main
    from training.config import Config, validate
    from training.models import float8
    from training.parallel.deepspeed import DeepSpeed

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    plain, converted = Transformer(cfg), Transformer(cfg)
    converted.load_state_dict(plain.state_dict())
    keys = list(plain.state_dict())
    convert_to_float8_training(converted, config=Float8LinearConfig(pad_inner_dim=True),
                               module_filter_fn=float8.float8_layer)  # convert(), past its device check
    swapped = {n for n, m in converted.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == {f"layers.{i}.{part}" for i in range(2) for part in
                       ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert list(converted.state_dict()) == keys
    tokens, targets = torch.randint(0, 96, (2, 12)), torch.randint(0, 96, (2, 12))  # 24 rows: padded to 32
    results = []
    for model in (plain, converted):
        loss = -model(tokens, targets=targets, summed=True) / targets.numel()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert abs(results[1][0] - results[0][0]) < 0.01 * results[0][0]
    for name, grad in results[0][1].items():
        assert (results[1][1][name] - grad).norm() <= 0.2 * grad.norm(), name
    moe = Transformer(ModelConfig(vocab_size=96, dim=64, n_layers=1, n_heads=4, max_seq_len=32,
                                  moe=MoEConfig(experts=16, top_k=2)))
    assert not any(float8.float8_layer(m, n) for n, m in moe.named_modules() if "router" in n)

    with pytest.raises(UserError, match=r"^train.float8=true: float8 matmuls need a CUDA GPU .* this run is on cpu$"):
        float8.convert(Transformer(cfg), torch.device("cpu"))
    config = Config()
    config.train.float8, config.lora.rank = True, 8
    assert any(p.startswith("train.float8=true: LoRA") for p in validate(config))
    config.lora.rank = 0
    assert DeepSpeed.check(config)[0].startswith("train.float8=true: not with DeepSpeed")

    monkeypatch.setattr(float8, "check", lambda device: None)
    # 8 validation samples, not the config's 256: torchao emulates float8 matmuls on a CPU, and evaluating 256
    # took a minute of the suite; the evaluation and its sample still run
    common = ["--config", TINY_CONFIG, *FAST, f"data.path={pretrain_shards}", "train.max_steps=3", "train.eval_every=3",
              "train.activation_checkpointing=full", "train.eval_samples=8"]
    for name, extra in (("plain", []), ("float8", ["train.float8=true"])):
        assert stage_main("pretrain", [*common, f"out_dir={tmp_path / name}", *extra]) == 0
    plain_losses, float8_losses = losses(tmp_path / "plain"), losses(tmp_path / "float8")
    assert sorted(float8_losses) == [1, 2, 3] and val_losses(tmp_path / "float8")
    assert float8_losses != plain_losses  # float8's rounding: the layers were converted
    for step, value in plain_losses.items():
        assert float8_losses[step] == pytest.approx(value, rel=0.02), step
    assert not any(isinstance(m, Float8Linear) for m in load_for_inference(str(tmp_path / "float8"))[0].modules())


def test_fused_adamw_skips_a_non_finite_step_on_the_device_as_the_host_check_does():
    """DDP's step with fused AdamW decides on the device (found_inf): a NaN gradient changes neither the weights nor
    the optimizer's moments and step count, and the finite steps around it update as the foreach AdamW, whose
    skip the host decides, does."""
    runs = {}
    for fused in (False, True):
        model = _small_model()
        backend = DDP(None, D.DistEnv(), None, "fp32")
        backend.setup(model, lambda m, fused=fused: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused))
        norms, applied = [], []
        for step in range(3):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, math.nan if step == 1 else 0.01 * (i + 1))
            norm, ok = backend.step(1.0, torch.tensor(2.0))
            norms.append(float(norm))
            applied.append(bool(ok))
            assert isinstance(ok, torch.Tensor) == fused  # fused: left on the device
        state = backend.optimizer.state_dict()["state"]
        runs[fused] = ([p.detach().clone() for p in model.parameters()], state, applied)
    assert runs[True][2] == runs[False][2] == [True, False, True]
    for a, b in zip(runs[True][0], runs[False][0], strict=True):
        torch.testing.assert_close(a, b)
    for key, s in runs[False][1].items():
        assert float(runs[True][1][key]["step"]) == float(s["step"]) == 2  # the skipped step is not counted
        torch.testing.assert_close(runs[True][1][key]["exp_avg_sq"], s["exp_avg_sq"])


def test_loss_is_normalised_by_the_target_tokens_of_the_whole_global_batch(tmp_path):
    # reference: the mean over every target token of the global batch, computed in one piece by hand
    model = _small_model()
    all_batches = _uneven_batches(0) + _uneven_batches(1)
    x = torch.cat([b.inputs for b in all_batches])
    y = torch.cat([b.targets for b in all_batches])
    logits = model(x)
    keep = y != IGNORE
    logp = torch.log_softmax(logits.float(), -1)
    nll = -logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (nll[keep].sum() / keep.sum()).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}

    # 2 ranks x 2 micro-batches through DDP (gloo), as built and compiled whole: the gradients are reduced once
    # (DDP's no_sync on the first micro-batch, also through the compiled wrapper), and are the reference's
    reductions = {}
    for compiled in (False, True):
        out = str(tmp_path / f"grads-{compiled}.pt")
        torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), out, compiled), nprocs=2, join=True)
        saved = torch.load(out, weights_only=True)
        reductions[compiled] = saved["reductions"]
        for name, grad in reference.items():
            torch.testing.assert_close(saved["grads"][name], grad, rtol=1e-5, atol=1e-7)
    assert reductions[True] == reductions[False] == 1, reductions  # the small model's gradients fill one bucket

    # what a per-micro-batch mean would have given is measurably different
    naive = _small_model()
    for b in all_batches:
        loss, n = lm_loss_sum(naive(b.inputs), b.targets)
        (loss / n / len(all_batches)).backward()
    diff = max((p.grad - reference[n]).abs().max().item() for n, p in naive.named_parameters())
    assert diff > 1e-3


def test_the_end_of_a_process_waits_for_its_thread_pools_and_keeps_the_exit_code(tmp_path):
    """distributed.exit_process: what the interpreter does before finalizing (thread pools stopped, threads
    joined, atexit handlers, streams flushed), then os._exit with the code. A pool's idle worker (torch.compile
    keeps one) is not a thread to wait for forever."""
    script = ("import atexit, concurrent.futures, sys\n"
              "from training.parallel.env import exit_process\n"
              "pool = concurrent.futures.ThreadPoolExecutor(2)\n"
              "pool.submit(lambda: 1).result()\n"
              "atexit.register(lambda: print('atexit ran'))\n"
              "sys.stdout.write('buffered, no newline')\n"
              "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 3 and proc.stdout == "buffered, no newlineatexit ran\n", (proc.stdout, proc.stderr)


@pytest.mark.slow
def test_two_processes_with_half_the_accumulation_give_the_same_losses(pretrain_shards, tmp_path):
    # one dense block and one mixture-of-experts block (with a shared expert and both router losses): the router
    # losses join the gradient, and must not depend on how the batch is split either
    moe = ["model.moe.experts=4", "model.moe.every=2", "model.moe.shared_experts=1", "model.moe.z_loss_coef=0.001"]
    common = [f"data.path={pretrain_shards}", "train.max_steps=6", "train.precision=fp32", "train.eval_every=3",
              "train.eval_samples=21", *moe]
    run_training(*common, f"out_dir={tmp_path / 'one'}", "train.grad_accum=4")
    run_training(*common, f"out_dir={tmp_path / 'two'}", "train.grad_accum=2", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for key in ("loss", "moe_aux", "moe_z", "moe_load/1", "grad_norm"):
        one, two = losses(tmp_path / "one", key), losses(tmp_path / "two", key)
        assert sorted(one) == sorted(two) == list(range(1, 7)), key
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-5), key
    assert losses(tmp_path / "one")[6] < losses(tmp_path / "one")[1]
    assert 1 <= losses(tmp_path / "one", "moe_load/1")[1] <= 4 and not losses(tmp_path / "one", "moe_load/0")
    val_one, val_two = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert sorted(val_one) == sorted(val_two) == [0, 3, 6]  # 21 samples: uneven shares of 11 and 10 on two ranks
    for step in val_one:
        assert val_two[step] == pytest.approx(val_one[step], rel=1e-5)


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(pretrain_shards, tmp_path):
    common = [f"data.path={pretrain_shards}", "train.max_steps=10", "train.ckpt_every=4", "train.eval_every=5",
              "train.eval_samples=16"]
    run_training(*common, f"out_dir={tmp_path / 'straight'}")
    out = tmp_path / "killed"
    kill_after_first_checkpoint([sys.executable, "-m", "training.pretrain", "--config", TINY_CONFIG, *FAST, *common,
                                 f"out_dir={out}"], out)
    latest = out / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step-4"
    assert max(losses(out)) < 10  # it really stopped part-way
    run_training(*common, f"out_dir={out}")
    assert losses(out) == losses(tmp_path / "straight")  # exactly, not approximately
    a = torch.load(out / "checkpoints" / "step-10" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoints" / "step-10" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    val = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "val_loss" in line]
    assert val == [0, 5, 10]  # no evaluation logged twice across the restart


@pytest.mark.slow
def test_generate_continues_a_prompt_from_a_run(pretrain_shards, tmp_path):
    run_training(f"data.path={pretrain_shards}", "train.max_steps=3", f"out_dir={tmp_path / 'r'}")
    proc = subprocess.run([sys.executable, "-m", "training.generate", "--checkpoint", str(tmp_path / "r"),
                           "--prompt", "HAMLET:", "--max-new-tokens", "20", "--greedy"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("HAMLET:") and len(proc.stdout) > len("HAMLET:") + 5
    again = subprocess.run([sys.executable, "-m", "training.generate", "--checkpoint",
                            str(tmp_path / "r" / "checkpoints" / "step-3"), "--prompt", "HAMLET:",
                            "--max-new-tokens", "20", "--greedy"], capture_output=True, text=True, cwd=REPO)
    assert again.stdout == proc.stdout


def test_the_training_benchmark_runs_its_data_path_and_its_baseline(pretrain_shards):
    """bench/ is not in make test; its helpers use the training package's own API, so an API change must not
    leave `make bench` broken. (In a process of its own: the baseline changes allocator settings and seeds.)"""
    small = [o for o in FAST if o.startswith(("model.", "data.", "train.micro"))] + ["log.every=1", "train.device=cpu"]
    script = ("import sys; sys.path.insert(0, 'bench'); import train as bench\n"
              f"args = ({TINY_CONFIG!r}, {pretrain_shards!r})\n"
              f"print(bench.loader_rate(*args, {small!r}, steps=3), bench.bare(*args, 3, {small!r}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(float(rate) > 0 for rate in proc.stdout.split())


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_and_both_states_round_trip():
    from training.models.optim import make_optimizer
    from training.models.transformer import MoEConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16,
                                    moe=MoEConfig(experts=2, every=2)))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon, adamw = optimizer.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert {"layers.0.attention.wq.weight", "layers.1.feed_forward.router.weight", "layers.1.feed_forward.w1"} <= in_muon
    assert {"tok_embeddings.weight", "layers.0.attention_norm.weight", "norm.weight"} <= in_adamw
    assert not in_muon & in_adamw and len(in_muon | in_adamw) == len(names)  # every parameter, once
    # two steps, then a copy restored from the state dict takes a third step exactly as the original
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def step(m, o):
        m(tokens).square().mean().backward()
        o.step()
        o.zero_grad()

    for _ in range(2):
        step(model, optimizer)
    copy = Transformer(model.cfg)
    copy.load_state_dict(model.state_dict())
    restored = make_optimizer(copy, TrainConfig(optimizer="muon"), torch.device("cpu"))
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)  # as a checkpoint holds it, and reads it back (weights only)
    restored.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    step(model, optimizer)
    step(copy, restored)
    for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="saved optimizer state"):  # e.g. an AdamW run's
        restored.load_state_dict(make_optimizer(copy, TrainConfig(), torch.device("cpu")).state_dict())
    with pytest.raises(UserError, match="train.optimizer=muon: LoRA adapters train with train.optimizer=adamw"):
        load_config(TINY_CONFIG, ["train.optimizer=muon", "lora.rank=4"])
    from training.parallel.deepspeed import DeepSpeed  # the backend says what it cannot do

    assert DeepSpeed.check(load_config(TINY_CONFIG, ["train.optimizer=muon"]))[0].startswith(
        "train.optimizer=muon: DeepSpeed's ZeRO partitions each matrix")
    assert DeepSpeed.check(load_config(TINY_CONFIG)) == DDP.check(load_config(TINY_CONFIG, ["train.optimizer=muon"])) == []


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_activation_checkpointing_gives_the_same_losses_and_gradients_bit_for_bit(lora_rank):
    """fp32 on CPU: recomputing a block in the backward repeats its forward exactly (an MoE block, its routing
    losses and LoRA adapters included)."""
    from training.config import LoraConfig
    from training.models import lora
    from training.models.transformer import MoEConfig, grouped_mm_works

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, max_seq_len=16, moe=MoEConfig(experts=4, every=2))
    stage = _lm_stage()
    batches = [Batch(*(lambda t: (t[:, :-1], t[:, 1:]))(torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(i))),
                     real_tokens=32) for i in range(2)]
    env = D.DistEnv()
    results = {}
    for mode in ("full", "every_n", "none"):
        grouped_mm_works.cache_clear()  # found out inside a checkpointed block's first forward, too
        torch.manual_seed(0)
        model = Transformer(cfg)
        if lora_rank:
            lora.apply(model, LoraConfig(rank=lora_rank, targets=["wq", "wv", "w2"]))
        model.checkpoint_activations(mode, every=2)
        assert [b.checkpointed for b in model.layers] == {"none": [False] * 3, "full": [True] * 3,
                                                           "every_n": [True, False, True]}[mode]
        loss, metrics = _accumulate(stage, _backend(model, env), batches, env)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))  # nothing held after
        results[mode] = (loss, metrics["moe_aux"], grads)
    for mode in ("full", "every_n"):
        assert torch.equal(results[mode][0], results["none"][0]) and torch.equal(results[mode][1], results["none"][1])
        assert results[mode][2].keys() == results["none"][2].keys()
        for name, grad in results["none"][2].items():
            assert torch.equal(results[mode][2][name], grad), (mode, name)


def test_our_muon_is_torchs_update_in_bf16_and_orthogonalises_stacked_experts_one_by_one():
    from training.models.optim import Muon

    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96)]:  # tall and wide
        theirs, ours = torch.nn.Parameter(torch.randn(*shape)), torch.nn.Parameter(torch.randn(*shape))
        ours.data.copy_(theirs.data)
        reference = torch.optim.Muon([theirs], lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True,
                                     adjust_lr_fn="match_rms_adamw")
        mine = Muon([ours], lr=0.01, weight_decay=0.1, momentum=0.95, ns_dtype=torch.bfloat16)
        for _ in range(3):
            grad = torch.randn(*shape)
            theirs.grad, ours.grad = grad.clone(), grad.clone()
            reference.step()
            mine.step()
        assert torch.equal(theirs, ours), shape
    # fp32 (CPU's default): each matrix of a stack as if alone, and close to orthogonal (singular values ~0.7-1.2)
    grads = torch.randn(3, 16, 48)
    stacked = Muon.orthogonalise(grads, 5, torch.float32)
    for e in range(3):
        assert torch.allclose(stacked[e], Muon.orthogonalise(grads[e], 5, torch.float32), atol=1e-6)
    singular = torch.linalg.svdvals(stacked)
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_a_tied_output_layer_is_an_output_layer_without_a_weight_of_its_own():
    """OutputLayer.tied_to makes the projection as nn.Linear would, but for the weight, which is the embedding's
    (never one of its own: under ZeRO-3's zero.Init that would be made whole): the same attributes, so a torch
    whose nn.Linear gains one shows here."""
    from torch import nn

    from training.models.transformer import OutputLayer

    embedding = nn.Embedding(11, 4)
    tied, plain = OutputLayer.tied_to(embedding), OutputLayer(4, 11, bias=False)
    assert vars(tied).keys() == vars(plain).keys() and repr(tied) == repr(plain)
    assert tied.weight is embedding.weight and [n for n, _ in tied.named_parameters()] == ["weight"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(tied(x), x @ embedding.weight.T)


def test_the_harness_is_due_at_the_end_of_a_cycle_holding_a_due_step():
    """eval.every=5 with GRPO's cycles of 2 steps (the loop evaluates only at a cycle's end): at 6, 10, 16 and the
    last step, none dropped; without cycles at 5, 10, 15, 20."""
    from training.run.evaluation import harness_due

    cfg = Config()
    cfg.eval.tasks, cfg.eval.every, cfg.train.max_steps = ["task"], 5, 20
    assert [s for s in range(2, 21, 2) if harness_due(cfg, s, 2)] == [6, 10, 16, 20]
    assert [s for s in range(1, 21) if harness_due(cfg, s)] == [5, 10, 15, 20]
    cfg.eval.tasks = []
    assert not any(harness_due(cfg, s) for s in range(1, 21))
