"""Mixture-of-experts blocks: the computation (against the dense model and against itself in other batches), the
router losses (against transformers'), and the whole path of a run: train, sample, export as transformers
Mixtral and Qwen2-MoE, start from the export with LoRA."""

import dataclasses
import json

import pytest
import torch
from conftest import CHAT, SFT_CONFIG, losses, run_training

from training.models.transformer import KVCache, ModelConfig, MoEConfig, Transformer

SMALL = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def moe_model(seed=0, **moe) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(SMALL, moe=MoEConfig(**moe)))


def test_two_identical_experts_with_top_2_compute_the_dense_model():
    torch.manual_seed(0)
    dense = Transformer(SMALL)
    moe = moe_model(experts=2, top_k=2)
    theirs = dense.state_dict()
    state = {}
    for name, value in moe.state_dict().items():
        if name.endswith(("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")):  # each expert = the dense one
            state[name] = theirs[f"{name}.weight"].unsqueeze(0).expand_as(value).clone()
        elif "router" in name:
            state[name] = torch.randn_like(value)  # any routing: both experts are chosen, their weights sum to 1
        else:
            state[name] = theirs[name]
    moe.load_state_dict(state)
    tokens = torch.randint(0, SMALL.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (moe(tokens) - dense(tokens)).abs().max().item() < 1e-5
    # and with different experts it is another function (the comparison above can fail)
    state = {k: v + 0.05 * torch.randn_like(v) if k.endswith("feed_forward.w1") else v for k, v in state.items()}
    moe.load_state_dict(state)
    with torch.no_grad():
        assert (moe(tokens) - dense(tokens)).abs().max().item() > 1e-3


def test_routing_and_outputs_do_not_depend_on_the_rest_of_the_batch():
    model = moe_model(experts=4, top_k=2, shared_experts=1).train()
    generator = torch.Generator().manual_seed(2)
    row = torch.randint(0, SMALL.vocab_size, (1, 24), generator=generator)
    others = torch.randint(0, SMALL.vocab_size, (5, 24), generator=generator)
    alone = model(row)
    chosen_alone = [layer.feed_forward.routing.chosen for layer in model.layers]
    batch = model(torch.cat([others[:2], row, others[2:]]))
    chosen_in_batch = [layer.feed_forward.routing.chosen[2:3] for layer in model.layers]
    for a, b in zip(chosen_alone, chosen_in_batch, strict=True):
        assert torch.equal(a, b)
    assert (batch[2:3] - alone).abs().max().item() < 1e-5
    # the experts are really used unevenly: the test would see a routing that depended on the batch
    assert len(torch.unique(torch.cat([c.flatten() for c in chosen_in_batch]))) == 4


def test_decoding_with_the_cache_gives_the_logits_of_the_whole_sequence():
    model = moe_model(experts=4, top_k=2, every=2).eval()
    tokens = torch.randint(0, SMALL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(tokens)
        cache = KVCache(model.cfg, 2, 12, "cpu", torch.float32)
        steps = [model(tokens[:, :5], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(5, 12)]
    assert (torch.cat(steps, dim=1) - whole).abs().max().item() < 1e-5


def test_the_balance_loss_of_one_row_is_transformers_mixtral_loss_over_top_k():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(SMALL, n_layers=1, moe=MoEConfig(experts=4, top_k=2, aux_loss_coef=1.0,
                                                                            z_loss_coef=0.5))).train()
    tokens = torch.randint(0, SMALL.vocab_size, (1, 24), generator=torch.Generator().manual_seed(4))
    positions = torch.ones(1, 24, dtype=torch.bool)
    positions[0, 17:] = False  # padding at the end of the row counts for neither
    model(tokens)
    logits = model.layers[0].feed_forward.routing.logits
    loss, metrics, loads = model.auxiliary_losses(positions)
    assert model.layers[0].feed_forward.routing is None  # taken: a later forward starts afresh
    # transformers counts every token top_k times; ours is a sum over the row's 17 tokens
    theirs = mixtral.load_balancing_loss_func((logits[0],), 4, 2, attention_mask=positions)
    assert metrics["moe_aux"].item() / 17 == pytest.approx(theirs.item() / 2, rel=1e-5)
    assert metrics["moe_aux"].item() / 17 > 1  # 1 only when perfectly balanced, which random routing is not
    z = torch.logsumexp(logits[0, :17], dim=-1).square().sum()
    assert loss.item() == pytest.approx(metrics["moe_aux"].item() + 0.5 * z.item(), rel=1e-5)
    assert set(loads) == {0} and loads[0].sum().item() == 17 * 2


def test_a_mixture_of_experts_run_samples_exports_as_mixtral_and_fine_tunes_from_the_export(
        pretrain_shards, chat_shards, tmp_path):
    from test_hf import export

    from training.checkpoint import weights as ckpt

    moe = ["model.moe.experts=4", "model.moe.top_k=2", "model.moe.z_loss_coef=0.001"]
    pretrain = tmp_path / "pretrain"
    run_training(f"data.path={pretrain_shards}", "train.max_steps=3", "train.eval_every=3", f"out_dir={pretrain}", *moe)
    assert losses(pretrain, "sample") and losses(pretrain, "moe_aux")  # evaluation sampled through the experts
    proc = export(pretrain, tmp_path / "hf")
    assert proc.returncode == 0 and "transformers reproduces our logits" in proc.stdout, proc.stderr
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == ["MixtralForCausalLM"]
    assert ckpt.model_config(str(tmp_path / "hf")).moe == ckpt.model_config(str(pretrain / "checkpoints" / "step-3")).moe

    runs = {}
    for name, start in (("run", pretrain), ("hf", tmp_path / "hf")):
        out = tmp_path / f"sft-{name}"
        run_training(f"data.path={chat_shards['sft']}", f"init_from={start}", "train.max_steps=2", f"out_dir={out}",
                     "lora.rank=4", "lora.targets=[wq,wk,wv,wo]", *CHAT, stage="sft", config=SFT_CONFIG)
        runs[name] = losses(out)
    assert runs["hf"] == runs["run"] and sorted(runs["run"]) == [1, 2]


@pytest.mark.parametrize("shared", [1, 0])  # 0: Qwen2-MoE's shared expert exported empty (zero-size weights)
def test_dense_blocks_between_and_a_shared_expert_export_as_qwen2_moe(shared, pretrain_shards, tmp_path):
    from test_hf import export, transformers

    from training.checkpoint import weights as ckpt

    run = tmp_path / "run"
    run_training(f"data.path={pretrain_shards}", "train.max_steps=2", f"out_dir={run}",
                 "model.moe.experts=4", "model.moe.every=2", f"model.moe.shared_experts={shared}", "model.moe.expert_hidden=64")
    proc = export(run, tmp_path / "hf")
    assert proc.returncode == 0 and "transformers reproduces our logits" in proc.stdout, proc.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM"
    cfg = ckpt.model_config(str(tmp_path / "hf"))
    assert (cfg.moe.every, cfg.moe.shared_experts, cfg.moe.expert_hidden) == (2, shared, 64)
    ours = Transformer(cfg).eval()
    ckpt.load_weights(str(tmp_path / "hf"), ours)
    tokens = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() < 1e-4


def test_compiled_moe_blocks_with_activation_checkpointing_compute_what_eager_ones_do():
    """train.compile traces the experts' matmul through its meta kernel, which (torch 2.13) takes bf16 only where
    CPU's eager kernel also takes fp32: the loop's choice must hold under compile too. aot_eager traces forward and
    backward as inductor does, without its code generation (minutes on a CPU)."""
    model = moe_model(experts=4, top_k=2, shared_experts=1).train()
    tokens = torch.randint(0, SMALL.vocab_size, (3, 20), generator=torch.Generator().manual_seed(3))
    model.choose_expert_matmul("cpu", torch.float32, compiled=False)
    model(tokens).square().mean().backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.choose_expert_matmul("cpu", torch.float32, compiled=True)
    for block in model.layers:  # and with activation checkpointing, which compile traces as its own operator
        block.checkpointed = True
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(tokens).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad - eager[name]).abs().max().item() < 1e-5, name


def test_moe_settings_are_checked_by_key():
    from conftest import TINY_CONFIG

    from preprocess.errors import UserError
    from training.config import load_config

    for override, key in (("model.moe.top_k=5", "model.moe.top_k"), ("model.moe.every=0", "model.moe.every"),
                          ("model.moe.aux_loss_coef=-1", "model.moe.aux_loss_coef")):
        with pytest.raises(UserError, match=key):
            load_config(TINY_CONFIG, ["model.moe.experts=4", override])


def test_router_losses_of_padded_rows_add_up_the_same_however_the_rows_are_split():
    """The padded layouts (SFT, DPO, KTO rows without packing): a sum over positions holding a token, so any split
    of the rows over micro-batches or processes sums to the whole batch's."""
    model = moe_model(experts=4, top_k=2, z_loss_coef=0.1).train()
    tokens = torch.randint(0, SMALL.vocab_size, (4, 20), generator=torch.Generator().manual_seed(6))
    positions = torch.arange(20).expand(4, 20) < torch.tensor([[20], [13], [7], [16]])  # right padding
    model(tokens)
    whole = model.auxiliary_losses(positions)
    parts = []
    for rows in (slice(0, 1), slice(1, 4)):
        model(tokens[rows])
        parts.append(model.auxiliary_losses(positions[rows]))
    assert parts[0][0].item() + parts[1][0].item() == pytest.approx(whole[0].item(), rel=1e-6)
    for key in ("moe_aux", "moe_z"):
        assert parts[0][1][key].item() + parts[1][1][key].item() == pytest.approx(whole[1][key].item(), rel=1e-6)
    assert torch.equal(parts[0][2][1] + parts[1][2][1], whole[2][1]) and whole[2][1].sum().item() == 2 * 56
    # padding changes nothing: the same rows with other tokens in their padding give the same losses
    model(torch.where(positions, tokens, 0))
    assert model.auxiliary_losses(positions)[0].item() == pytest.approx(whole[0].item(), rel=1e-6)
