"""LoRA through peft: only the adapters train; checkpoints resume exactly and load merged into a plain model;
DPO's reference is the base model with its adapters off."""

import math
import os
import shutil

import pytest
import torch
from conftest import CHAT, DPO_CONFIG, SFT_CONFIG, kill_after_first_checkpoint, losses, run_command, run_training, start_training

from preprocess.errors import UserError
from training.config import LoraConfig
from training.models import lora
from training.models.transformer import ModelConfig, Transformer

pytest.importorskip("peft")

LORA = ["lora.rank=4", "lora.alpha=8", "train.lr=3e-3", "train.warmup_steps=1"]


def load_raw(ckpt_dir):
    return torch.load(os.path.join(ckpt_dir, "model.pt"), weights_only=True)


@pytest.fixture(scope="module")
def lora_sft(sft_run, chat_shards, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("lora") / "sft"
    run_training(f"data.path={chat_shards['sft']}", f"init_from={sft_run}", "train.max_steps=4", f"out_dir={out}",
                 *CHAT, *LORA, stage="sft", config=SFT_CONFIG)
    return str(out)


def test_only_the_adapters_change_and_the_merged_model_computes_the_adapted_one(sft_run, lora_sft):
    from training.checkpoint import weights as ckpt
    from training.config import config_from_yaml
    from training.models import lora
    from training.models.transformer import Transformer

    start = load_raw(ckpt.resolve(sft_run))
    trained_dir = ckpt.resolve(lora_sft)
    trained = load_raw(trained_dir)
    adapters = [k for k in trained if ".lora_" in k]
    assert len(adapters) == 2 * 7 * 2  # A and B of seven projections in two layers
    for key, value in trained.items():  # frozen: every base weight is bit-identical to the start
        if ".lora_" not in key:
            assert torch.equal(value, start[key.replace(".base_layer", "")]), key
    assert any(k.endswith("lora_B.default.weight") and trained[k].abs().max() > 0 for k in adapters)

    cfg = config_from_yaml(os.path.join(trained_dir, "config.yaml"))
    adapted = lora.apply(Transformer(cfg.model), cfg.lora)
    adapted.load_state_dict(trained)
    merged = Transformer(cfg.model)
    ckpt.load_weights(trained_dir, merged)  # a plain model gets the adapters merged
    base = Transformer(cfg.model)
    ckpt.load_weights(ckpt.resolve(sft_run), base)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(tokens) - adapted(tokens)).abs().max() < 1e-5
        assert (merged(tokens) - base(tokens)).abs().max() > 1e-3
        with lora.adapters_disabled(adapted):  # adapters off: the starting model exactly
            assert torch.equal(adapted(tokens), base(tokens))


def test_lora_optimizer_holds_only_the_adapters(lora_sft):
    from training.checkpoint import weights as ckpt

    state = torch.load(os.path.join(ckpt.resolve(lora_sft), "optimizer.pt"), weights_only=True)
    n_tensors = sum(len(g["params"]) for g in state["param_groups"])
    assert n_tensors == 2 * 7 * 2


def test_lora_on_two_processes_equals_one_with_double_accumulation(sft_run, chat_shards, tmp_path):
    common = [f"data.path={chat_shards['sft']}", f"init_from={sft_run}", "train.max_steps=3", *CHAT, *LORA]
    run_training(*common, "train.grad_accum=2", f"out_dir={tmp_path / 'one'}", stage="sft", config=SFT_CONFIG)
    run_training(*common, f"out_dir={tmp_path / 'two'}", nproc=2, stage="sft", config=SFT_CONFIG)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3}
    for step in one:
        assert math.isclose(one[step], two[step], rel_tol=1e-5), (step, one[step], two[step])


def test_lora_resumes_exactly_after_kill_9(sft_run, chat_shards, tmp_path):
    common = [f"data.path={chat_shards['sft']}", f"init_from={sft_run}", "train.max_steps=6", *CHAT, *LORA]
    run_training(*common, f"out_dir={tmp_path / 'straight'}", stage="sft", config=SFT_CONFIG)
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(start_training(*common, f"out_dir={killed}", "train.ckpt_every=2", stage="sft",
                                                 config=SFT_CONFIG), killed)
    run_training(*common, f"out_dir={killed}", "train.ckpt_every=2", stage="sft", config=SFT_CONFIG)
    assert losses(killed) == losses(tmp_path / "straight")


def test_lora_dpo_reference_is_the_base_model_and_precomputing_it_gives_the_same_losses(lora_sft, chat_shards,
                                                                                         tmp_path):
    dpo = tmp_path / "dpo"  # a copy: the reference log-probs are cached next to the shards, not in the shared ones
    shutil.copytree(chat_shards["dpo"], dpo, ignore=shutil.ignore_patterns("ref_logps-*"))  # nor others' caches
    common = [f"data.path={dpo}", f"init_from={lora_sft}", "train.max_steps=3", *CHAT, *LORA]
    run_training(*common, f"out_dir={tmp_path / 'live'}", stage="dpo", config=DPO_CONFIG)
    run_training(*common, "dpo.precompute_ref=true", f"out_dir={tmp_path / 'pre'}", stage="dpo", config=DPO_CONFIG)
    live, pre = losses(tmp_path / "live"), losses(tmp_path / "pre")
    # new adapters start at zero: the policy is its reference, so the first loss is ln 2 and the margin 0
    assert math.isclose(live[1], math.log(2), rel_tol=1e-6)
    assert len([f for f in os.listdir(dpo) if f.startswith("ref_logps-")]) == 1
    assert losses(tmp_path / "live", "rewards/margins")[1] == 0
    assert losses(tmp_path / "live", "rewards/margins")[3] != 0
    for step in live:
        assert math.isclose(live[step], pre[step], rel_tol=1e-5, abs_tol=1e-6)


def test_lora_targets_must_name_linear_layers(sft_run, chat_shards, tmp_path):
    proc = run_training(f"data.path={chat_shards['sft']}", f"init_from={sft_run}", "train.max_steps=1", *CHAT,
                        "lora.rank=4", "lora.targets=[wq,attention_norm]", f"out_dir={tmp_path}", stage="sft",
                        config=SFT_CONFIG, check=False)
    assert proc.returncode == 1 and "lora.targets: ['attention_norm'] names no linear layer" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the output layer is a linear one, whose weight the loss reads directly: refused by name
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16))
    with pytest.raises(UserError, match="lora.targets: output takes no adapter"):
        lora.apply(model, LoraConfig(rank=4, targets=["wq", "output"]))


def test_describe_counts_the_adapters_the_run_trains(sft_run, lora_sft, chat_shards):


    from training.checkpoint import weights as ckpt

    trained = sum(v.numel() for k, v in load_raw(ckpt.resolve(lora_sft)).items() if ".lora_" in k)
    proc = run_command("-m", "training.describe", "--config", SFT_CONFIG, f"data.path={chat_shards['sft']}",
                       f"init_from={sft_run}", *CHAT, *LORA)
    assert proc.returncode == 0, proc.stderr
    assert f"on 14 layers (wq, wk, wv, wo, w1, w2, w3): {trained / 1e6:.3f} M trainable parameters" in proc.stdout
    assert f"sft: starts from the weights of {ckpt.resolve(sft_run)}" in proc.stdout
    # the starting point is the run's: a context the starting model does not have is refused as the run refuses it
    refused = run_command("-m", "training.describe", "--config", SFT_CONFIG, f"data.path={chat_shards['sft']}",
                          f"init_from={sft_run}", *LORA)
    assert refused.returncode == 1 and refused.stderr == (
        f"error: data.seq_len=256 is longer than the context of the model of init_from {sft_run} (64 tokens); lower "
        "data.seq_len\n")


def test_the_adapters_alone_export_as_a_peft_directory_that_reproduces_the_merged_model(sft_run, lora_sft, tmp_path):
    """LoRA on every projection, including the query and key ones whose rows transformers lays out otherwise."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preprocess.errors import UserError
    from training.checkpoint import weights as ckpt
    from training.export_hf import export, export_adapter
    from training.models.transformer import Transformer

    base = tmp_path / "base"
    export(sft_run, str(base))  # the LoRA run's init_from
    adapter = tmp_path / "adapter"
    report = export_adapter(lora_sft, str(adapter), str(base))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    config = json.load(open(adapter / "adapter_config.json"))
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert report["adapters"] == 7 * 2  # every projection of both layers of the test model

    merged = Transformer(ckpt.model_config(ckpt.resolve(lora_sft)))
    ckpt.load_weights(ckpt.resolve(lora_sft), merged)
    tokens = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        torch.testing.assert_close(theirs(input_ids=tokens).logits, merged.eval()(tokens), rtol=1e-4, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=tokens).logits
    assert not torch.allclose(plain, merged(tokens), atol=1e-3)  # the adapters changed something

    other = tmp_path / "other-base"
    export(lora_sft, str(other))  # merged weights: not the base the adapters sit on
    rounded = tmp_path / "bf16-base"
    export(sft_run, str(rounded), dtype="bfloat16")  # the right base, but rounded: not the weights trained on
    for wrong in (other, rounded):
        with pytest.raises(UserError, match="differs from the weights .* trained its adapters on"):
            export_adapter(lora_sft, str(tmp_path / f"adapter-{wrong.name}"), str(wrong))
        assert not os.path.exists(tmp_path / f"adapter-{wrong.name}")
    with pytest.raises(UserError, match="has no LoRA adapters"):
        export_adapter(sft_run, str(tmp_path / "adapter3"), str(base))
