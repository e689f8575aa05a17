"""The open model families against transformers itself. A tiny random model of each family is built with
transformers' own config class, every switch of that family on (Llama 3's rope scaling with a short original
context, tied embeddings, Qwen2's biases, Qwen3's q/k norms and a head size of its own, Qwen3-MoE's dense layers,
Mistral's and Gemma 3's sliding windows shorter than the sequences, Gemma's local rope base and score scale),
every weight (norms and biases too) moved off its initial value, and saved as bf16 shards with an index. Imported,
our logits must be transformers'; decoding with our KV cache must give its greedy text; fine-tuned with LoRA and
exported, the export must be the same family and give our logits in transformers, and the adapters in PEFT."""

import json
import os
import shutil

import pytest
import torch
from conftest import CHAT, DPO_CONFIG, SFT_CONFIG, losses, run_cli, run_command, run_training, shared_data, write_jsonl

transformers = pytest.importorskip("transformers")

SLIDING, FULL = "sliding_attention", "full_attention"
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
# model_type → (config class, what it sets beyond TINY): every switch of the family on
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                rope_theta=1000000.0))),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, norm_topk_prob=False,
                                         mlp_only_layers=[0])),
    "mistral": ("MistralConfig", dict(head_dim=32, sliding_window=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=8, layer_types=[SLIDING, FULL, SLIDING],
        rope_parameters={FULL: dict(rope_type="linear", factor=2.0, rope_theta=1000000.0),
                         SLIDING: dict(rope_type="default", rope_theta=10000.0)})),
}
WINDOWED = ["mistral", "gemma3_text"]


def save_tiny_model(model_type: str, path, tokenizer_model: str | None = None, **changes):
    """A random model of the family saved as bf16 shards (several files and an index); returns transformers'
    model loaded back from them in fp32."""
    name, extra = FAMILIES[model_type]
    config = getattr(transformers, name)(**(TINY | extra | changes))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms (1, or Gemma's 0) and biases (0) moved too: a wrong mapping of them shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="200KB")
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, os.path.join(path, "tokenizer.model"))
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_model) -> dict:
    """model_type → (its directory, transformers' model of it)."""
    root = tmp_path_factory.mktemp("families")
    return {t: (str(root / t), save_tiny_model(t, root / t, tokenizer_model)) for t in FAMILIES}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_an_imported_model_gives_transformers_logits(saved, model_type):
    from training.checkpoint.weights import loaded_model, model_config

    path, theirs = saved[model_type]
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1  # sharded, with its index
    cfg = model_config(path)
    assert cfg.family == model_type
    ours = loaded_model(path).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    tokens = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() < 1e-4


def test_each_family_switch_is_read():
    """What each family asks of our model, read from its config (the logits above show it is computed right)."""
    from training.models import hf

    def read(model_type):
        name, extra = FAMILIES[model_type]
        config = getattr(transformers, name)(**TINY, **extra).to_dict()
        return hf.FAMILIES[model_type].model_config(config, model_type)

    llama, qwen2, qwen3, qwen3_moe, qwen2_moe, mistral, gemma = map(read, FAMILIES)
    assert (llama.rope_scaling, llama.rope_factor, llama.rope_original_context, llama.tie_embeddings) == \
        ("llama3", 8.0, 16, True)
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.rope_theta == 1e6
    assert qwen3.qk_norm and qwen3.head_dim == 32 != qwen3.dim // qwen3.n_heads and not qwen3.qkv_bias
    assert [qwen3_moe.is_moe(i) for i in range(3)] == [True, False, True] and qwen3_moe.moe.renormalize
    assert not qwen2_moe.moe.renormalize and qwen2_moe.moe.shared_experts == 2 and qwen2_moe.qkv_bias
    assert (mistral.sliding_window, mistral.sliding_layers) == (8, [0, 1, 2])
    assert (gemma.sliding_layers, gemma.rope_local_theta, gemma.rope_scaling, gemma.attention_scale) == \
        ([0, 2], 10000.0, "linear", 24.0)
    assert gemma.norm_plus_one and gemma.sandwich_norm and gemma.embed_scale and gemma.activation == "gelu_tanh"


def test_keys_a_config_leaves_out_are_read_as_the_familys_config_class_reads_them():
    """A config.json without rope_theta, rms_norm_eps, sliding_window or query_pre_attn_scalar means the family
    config class's defaults (Mixtral's rope base is 1e6, Mistral's window 4096, Gemma's scalar 256), not ours."""
    from training.models import hf

    for model_type, left_out in (("mixtral", ("rope_parameters", "rope_theta", "rms_norm_eps")),
                                 ("mistral", ("sliding_window",)), ("gemma3_text", ("query_pre_attn_scalar",
                                                                                     "rope_parameters"))):
        name, extra = FAMILIES.get(model_type, ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)))
        config = {k: v for k, v in getattr(transformers, name)(**(TINY | extra)).to_dict().items() if k not in left_out}
        theirs = getattr(transformers, name)(**config)  # the config class fills in what is left out
        ours = hf.FAMILIES[model_type].model_config(config, model_type)
        full = theirs.rope_parameters.get("full_attention", theirs.rope_parameters)
        assert (ours.rope_theta, ours.norm_eps) == (full["rope_theta"], theirs.rms_norm_eps), model_type
        if model_type != "mixtral":
            assert ours.sliding_window == theirs.sliding_window, model_type
    gemma = transformers.Gemma3TextConfig(**config)  # the last of the loop: its scalar left out
    assert hf.FAMILIES["gemma3_text"].model_config(config, "gemma").attention_scale == gemma.query_pre_attn_scalar \
        == 256 != TINY["hidden_size"] // TINY["num_attention_heads"]


def test_a_model_trained_from_scratch_exports_as_the_first_family_that_computes_it():
    from preprocess.errors import UserError
    from training.models import hf
    from training.models.transformer import ModelConfig, MoEConfig

    plain = ModelConfig(vocab_size=512)  # n_kv_heads, ffn_hidden, head_size left at 0: the defaults
    assert hf.family_of(plain).model_type == "llama"
    assert hf.family_of(ModelConfig(vocab_size=512, moe=MoEConfig(top_k=4))).model_type == "llama"  # no experts
    assert hf.family_of(ModelConfig(vocab_size=512, qk_norm=True, head_size=32)).model_type == "qwen3"
    assert hf.family_of(ModelConfig(vocab_size=512, qkv_bias=True)).model_type == "qwen2"
    assert hf.family_of(ModelConfig(vocab_size=512, sliding_window=64, sliding_layers=[0, 1, 2, 3])).model_type == \
        "mistral"
    assert hf.family_of(ModelConfig(vocab_size=512, moe=MoEConfig(experts=4))).model_type == "mixtral"
    with pytest.raises(UserError, match="no transformers model family computes this model: Llama differs in qkv_bias"):
        hf.family_of(ModelConfig(vocab_size=512, qkv_bias=True, qk_norm=True))


@pytest.mark.parametrize("model_type", WINDOWED)
def test_decoding_past_the_window_with_the_cache_gives_transformers_logits(saved, model_type):
    """The KV cache keeps every position; a sliding layer's mask lets each new token see its last `window` only —
    one row, and rows left-padded to a batch (as training.sample decodes them)."""
    from training.checkpoint.weights import loaded_model
    from training.models.transformer import KVCache

    path, theirs = saved[model_type]
    ours = loaded_model(path).eval()
    rows = [torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(n)) for n in (42, 35)]
    prompt = 12
    pad = torch.tensor([0, 42 - 35])
    batch = torch.stack([rows[0], torch.cat([torch.zeros(7, dtype=torch.long), rows[1]])])
    with torch.no_grad():
        for tokens, left in ((batch[:1], None), (batch, pad)):
            cache = KVCache(ours.cfg, len(tokens), 42, "cpu", torch.float32)
            steps = [ours(tokens[:, :prompt], cache, pad=left)]
            steps += [ours(tokens[:, t:t + 1], cache, pad=left) for t in range(prompt, 42)]
            logits = torch.cat(steps, dim=1)
            for row, (ids, skip) in enumerate(zip(rows, [0, 7], strict=False)):
                if row < len(tokens):
                    expected = theirs(ids.unsqueeze(0)).logits[0]
                    assert (logits[row, skip:] - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("model_type", WINDOWED)
def test_a_packed_row_with_sliding_windows_computes_each_sequence_alone(saved, model_type):
    from training.checkpoint.weights import loaded_model

    ours = loaded_model(saved[model_type][0]).eval()
    a, b = (torch.randint(0, TINY["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n)) for n in (23, 17))
    segments = torch.tensor([[0] * 23 + [1] * 17])
    with torch.no_grad():
        packed = ours(torch.cat([a, b], dim=1), segments=segments)
        alone = torch.cat([ours(a), ours(b)], dim=1)
    assert (packed - alone).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def qwen2_with_its_tokenizer(tmp_path_factory) -> str:
    """A Qwen2 directory with Qwen's real tokenizer.json: transformers 5 reads a qwen2 directory's tokenizer as
    Qwen2Tokenizer whatever tokenizer_config.json says, so a Qwen2 model exports with Qwen's own tokenizer only
    (export_hf's check refuses another)."""
    tokenizer = shared_data("tokenizers", "qwen3")
    root = tmp_path_factory.mktemp("qwen2")
    save_tiny_model("qwen2", root / "model", vocab_size=151936)  # Qwen's own size: its tokenizer's ids fit
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer, name), root / "model" / name)
    return str(root / "model")


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_an_imported_model_exports_back_as_its_family(saved, model_type, chat_shards, tmp_path, request):
    """Two full-parameter SFT steps from the imported directory on chat shards (two, not ten: what an export must
    map back is weights an update changed, tied ones included; more steps add time, not coverage), then export_hf:
    the same model_type, and transformers' logits and token ids on the export are ours (export_hf checks both
    before the directory appears). Qwen2 exports with Qwen's own tokenizer only (docs/training.md), which our chat shards are not
    written in: its imported directory is exported as it is. Llama's through the command line, in bf16 and
    sharded."""
    from training.export_hf import export
    from training.export_hf import main as export_main

    if model_type == "qwen2":
        path = request.getfixturevalue("qwen2_with_its_tokenizer")
    else:
        path = str(tmp_path / "run")
        run_training(f"data.path={chat_shards['sft']}", f"init_from={saved[model_type][0]}", "train.max_steps=2",
                     "train.eval_every=2", "train.eval_samples=4", f"out_dir={path}", *CHAT, stage="sft",
                     config=SFT_CONFIG)
    report = export(path, str(tmp_path / "hf"))
    assert report["max_logit_diff"] < 1e-4
    assert json.load(open(tmp_path / "hf" / "config.json"))["model_type"] == model_type
    if model_type == "llama":
        assert export_main(["--checkpoint", path, "--out", str(tmp_path / "bf16"), "--dtype", "bf16",
                            "--max-shard-size", "100KB"]) == 0
        files = [f for f in os.listdir(tmp_path / "bf16") if f.endswith(".safetensors")]
        index = json.load(open(tmp_path / "bf16" / "model.safetensors.index.json"))
        assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
        assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen3_moe"])  # every dense switch; an MoE family
def test_lora_fine_tuning_exports_as_the_same_family_and_as_a_peft_adapter(saved, model_type, chat_shards, tmp_path):
    """Ten SFT steps with LoRA from the imported directory; the merged model exported as the family it came from
    (export_hf checks transformers' logits and token ids against ours before the directory appears), and the
    adapters alone for that directory as their base (checked through PEFT the same way). The families' exports
    without training are the test above; the adapters' names follow each family's tensor names."""
    from training.export_hf import export, export_adapter

    path = saved[model_type][0]
    # an MoE family's adapters on attention: PEFT takes its gate/up/down_proj for the experts (export_hf refuses)
    targets = "[wq,wk,wv,wo]" if "moe" in model_type else "[wq,wk,wv,wo,w1,w2,w3]"
    run = tmp_path / "run"
    run_training(f"data.path={chat_shards['sft']}", f"init_from={path}", "train.max_steps=10", f"out_dir={run}",
                 "lora.rank=4", f"lora.targets={targets}", *CHAT, stage="sft", config=SFT_CONFIG)
    report = export(str(run), str(tmp_path / "hf"))
    assert report["max_logit_diff"] < 1e-4
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["model_type"] == model_type
    adapter = export_adapter(str(run), str(tmp_path / "adapter"), path)
    assert adapter["max_logit_diff"] < 1e-4 and adapter["adapters"] > 0


def test_what_a_family_asks_and_we_do_not_compute_is_refused_by_key(saved, tmp_path):
    from preprocess.errors import UserError
    from training.checkpoint.weights import loaded_model
    from training.models import hf

    def refusal(model_type, **changes):
        name, extra = FAMILIES[model_type]
        config = getattr(transformers, name)(**TINY, **extra).to_dict() | changes
        with pytest.raises(UserError) as e:
            hf.FAMILIES[model_type].model_config(config, "config.json")
        return str(e.value)

    assert "rope_type='yarn' is not supported" in refusal("llama", rope_parameters=dict(rope_type="yarn", factor=4.0))
    assert "final_logit_softcapping=30.0 is not supported" in refusal("gemma3_text", final_logit_softcapping=30.0)
    assert "attention_bias=True is not supported" in refusal("qwen3", attention_bias=True)
    assert "hidden_act='gelu' is not supported" in refusal("mistral", hidden_act="gelu")
    assert "layer_types 'chunked_attention'" in refusal("gemma3_text", layer_types=["chunked_attention"] * 3)
    assert "quantization_config='fp8' is not supported" in refusal("qwen3", quantization_config={"quant_method": "fp8"})
    assert "moe_intermediate_size=0 must be positive" in refusal("qwen3_moe", moe_intermediate_size=0)

    # a directory whose tensors do not fit its config: named by the tensor
    src, _ = saved["qwen2"]
    bad = tmp_path / "qwen2-without-biases"
    shutil.copytree(src, bad)
    config = json.load(open(bad / "config.json"))
    json.dump(config | {"model_type": "qwen3"}, open(bad / "config.json", "w"))
    with pytest.raises(UserError, match=r"tensor 'model\.layers\.\d\.self_attn\.[qkv]_proj\.bias' has no place"):
        loaded_model(str(bad))
    json.dump(config | {"head_dim": 32}, open(bad / "config.json", "w"))
    with pytest.raises(UserError, match=r"tensor 'model\.layers\.\d\.self_attn\.[\w.]+' has shape"):
        loaded_model(str(bad))


@pytest.fixture(scope="module")
def qwen3_chat(tmp_path_factory) -> tuple[str, str]:
    """(a tiny Qwen3 directory with Qwen3's real tokenizer and chat template, SFT shards of the instruction set
    written in that template without reasoning)."""
    source = shared_data("tokenizers", "qwen3")
    root = tmp_path_factory.mktemp("qwen3-chat")
    save_tiny_model("qwen3", root / "model", vocab_size=151936)  # Qwen's own size: its tokenizer's ids fit
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(source, name), root / "model" / name)
    records = json.load(open(shared_data("llms_from_scratch", "instruction-data.json"), encoding="utf-8"))[:200]
    src = write_jsonl(root / "sft.jsonl", records)
    run_cli("shards", "--kind", "sft", "--input", src, "--tokenizer", root / "model", "--out", root / "sft",
            "--chat-template-kwargs", '{"enable_thinking": false}', "--max-len", "96")
    return str(root / "model"), str(root / "sft")


@pytest.mark.slow
def test_sft_of_an_imported_qwen3_in_its_own_template_is_the_same_on_two_processes_and_exports_its_tokenizer(
        qwen3_chat, tmp_path):
    """1 process x accumulation 4 and 2 processes x 2 give the same losses; the evaluation's sample is asked in the
    model's template and stops at its end of turn; the export carries the model's tokenizer files byte for byte,
    every end-of-turn id in generation_config.json, and renders a conversation as the shards did."""
    from training.export_hf import export

    model, shards = qwen3_chat
    common = [f"data.path={shards}", f"init_from={model}", "train.max_steps=2", "data.seq_len=96",
              "train.micro_batch_size=2", "train.eval_every=2", "train.sample_tokens=8", "log.every=1"]
    run_training(*common, "train.grad_accum=4", f"out_dir={tmp_path / 'one'}", stage="sft", config=SFT_CONFIG)
    run_training(*common, "train.grad_accum=2", f"out_dir={tmp_path / 'two'}", nproc=2, stage="sft",
                 config=SFT_CONFIG)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == [1, 2] and all(two[s] == pytest.approx(one[s], rel=1e-5) for s in one)
    assert losses(tmp_path / "one", "sample")  # sampled through the template (an error would have stopped the run)

    report = export(str(tmp_path / "one"), str(tmp_path / "hf"))
    assert report["max_logit_diff"] < 1e-4
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(tmp_path / "hf" / name, "rb").read() == open(os.path.join(model, name), "rb").read()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    generation = json.load(open(tmp_path / "hf" / "generation_config.json"))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    # the shards' options travel as the exported template's defaults: transformers renders as the shards were
    from test_chat_template import shard_documents

    record = json.load(open(shared_data("llms_from_scratch", "instruction-data.json"), encoding="utf-8"))[1]
    messages = [{"role": "user", "content": record["instruction"] + "\n\n" + record["input"]},
                {"role": "assistant", "content": record["output"]}]
    ids, _ = shard_documents(shards)[1]
    assert ids[:-1].tolist() == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[:len(prompt)].tolist() == prompt and tokenizer.convert_tokens_to_ids("</think>") in prompt
    proc = run_command("-m", "training.generate", "--checkpoint", tmp_path / "hf", "--chat", "--prompt",
                       "Name a colour.", "--max-new-tokens", "5")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


@pytest.mark.slow
def test_sft_under_zero3_from_an_imported_llama_gives_the_ddp_losses(saved, chat_shards, zero3, tmp_path):
    """ZeRO-3 builds the imported model partitioned (deepspeed.zero.Init) and each rank fills only its share of every
    tensor from the files: the same starting weights, so the same losses as DDP on the whole model."""
    path, _ = saved["llama"]
    common = [f"data.path={chat_shards['sft']}", f"init_from={path}", "train.max_steps=3", "train.grad_accum=2",
              "train.precision=fp32", "train.eval_every=3", *CHAT]
    run_training(*common, f"out_dir={tmp_path / 'ddp'}", nproc=2, stage="sft", config=SFT_CONFIG)
    run_training(*common, f"out_dir={tmp_path / 'zero3'}", *zero3, nproc=2, stage="sft", config=SFT_CONFIG)
    for key in ("loss", "val_loss"):
        ddp, ds = losses(tmp_path / "ddp", key), losses(tmp_path / "zero3", key)
        assert ddp and all(ds[step] == pytest.approx(ddp[step], rel=1e-4) for step in ddp), key


@pytest.mark.slow
def test_dpo_against_a_pinned_imported_reference_resumes_after_kill_9_as_if_uninterrupted(saved, chat_shards,
                                                                                          tmp_path):
    """The reference is the imported directory itself, pinned into the run (config.json and its safetensors
    shards); a run killed after its first checkpoint continues with the losses of one that was not."""
    from conftest import kill_after_first_checkpoint, private_copy, start_training

    from training.models import hf

    path, _ = saved["qwen3"]
    shards = private_copy(chat_shards["dpo"], tmp_path / "dpo-shards")
    common = [f"data.path={shards}", f"init_from={path}", "train.max_steps=4", "train.ckpt_every=2", *CHAT]
    run_training(*common, f"out_dir={tmp_path / 'straight'}", stage="dpo", config=DPO_CONFIG)
    pinned = tmp_path / "straight" / "reference"
    assert hf.is_hf_dir(str(pinned)) and len(hf.weight_files(str(pinned))) > 1
    out = tmp_path / "killed"
    kill_after_first_checkpoint(start_training(*common, f"out_dir={out}", stage="dpo", config=DPO_CONFIG), out)
    run_training(*common, f"out_dir={out}", stage="dpo", config=DPO_CONFIG)
    for key in ("loss", "rewards/margins"):
        assert losses(out, key) == losses(tmp_path / "straight", key)


ZERO3_BUILD = """
import dataclasses, sys
import torch
from training.checkpoint.weights import model_config, starting_model
from training.config import Config
from training.data.order import BatchPlan
from training.models.optim import adamw_for
from training.models.transformer import rope_tables
from training.parallel import env as D
from training.parallel.deepspeed import DeepSpeed

path = sys.argv[1]
cfg = Config()
cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, backend="deepspeed", zero_stage=3))
env = D.init("deepspeed", "cpu", 60, group_always=True)
model = starting_model(path, model_config(path), DeepSpeed(cfg, env, BatchPlan.of(cfg.train, 1, 0), "bf16"))
assert all(hasattr(p, "ds_tensor") and p.dtype == torch.bfloat16 for p in model.parameters())
assert model.rope_cos.dtype == model.rope_local_cos.dtype == torch.float32
assert torch.equal(model.rope_cos, rope_tables(model.cfg)[0])
assert torch.equal(model.rope_local_cos, rope_tables(model.cfg, local=True)[0])
# weight decay by each parameter's whole shape: a partition's own is flat
decay, no_decay = adamw_for(list(model.parameters()), cfg.train, torch.device("cpu")).param_groups
assert [p.ds_shape for p in no_decay["params"]] == [p.ds_shape for p in model.parameters() if len(p.ds_shape) < 2]
assert len(decay["params"]) > len(no_decay["params"]) > 0 and decay["weight_decay"] > 0
print("partitioned in bf16, rotary tables in fp32")
"""


def test_zero3_builds_an_imported_model_partitioned_in_bf16_with_fp32_rotary_tables(saved, tmp_path):
    """deepspeed.zero.Init makes every float tensor in the training dtype, the rotary tables too: they are computed
    again once it is left (in bf16, positions past 256 would round). Each parameter there is a flat partition: weight
    decay still goes by its whole shape (it once took every matrix for a norm gain, and decayed nothing)."""
    from conftest import free_port

    script = tmp_path / "build.py"
    script.write_text(ZERO3_BUILD)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}
    proc = run_command(script, saved["gemma3_text"][0], env=env)
    assert proc.returncode == 0 and "rotary tables in fp32" in proc.stdout, proc.stderr
