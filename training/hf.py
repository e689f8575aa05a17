"""Hugging Face transformers Llama (Mixtral, Qwen2-MoE for model.moe) ↔ our Transformer: configs, weights and
the tokenizer.

A mixture-of-experts model is a Mixtral when every block is MoE without shared experts, else a Qwen2-MoE (its
dense blocks between every model.moe.every-th, its sigmoid-gated shared expert; qkv_bias=False). Both route
as ours: softmax, top-k, the k weights renormalised. On disk their experts are one tensor per expert; in memory
transformers 5 stacks them as ours does.

The two models compute the same function; they differ in names and in one layout: our rotary embedding turns
interleaved pairs (x0, x1), (x2, x3), … of each head, transformers' turns the two halves (x_i, x_{i+d/2}). The
query and key projections are permuted row-wise between the layouts, which is exact.

Reading a transformers directory needs only safetensors; writing one (training.export_hf) needs transformers.
"""

from __future__ import annotations

import json
import os
import re

import torch

from preprocess.errors import UserError

from .model import ModelConfig, MoEConfig

CONFIG = "config.json"

# our parameter names → transformers' ({i}: the layer)
LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


def hf_class(cfg: ModelConfig) -> str:
    """The transformers model that computes what ours does: LlamaForCausalLM, MixtralForCausalLM or
    Qwen2MoeForCausalLM."""
    if not cfg.moe.experts:
        return "LlamaForCausalLM"
    return "MixtralForCausalLM" if cfg.moe.every == 1 and not cfg.moe.shared_experts else "Qwen2MoeForCausalLM"


# the chat template of preprocess/chat.py for transformers' apply_chat_template: each turn between its role
# marker and <|end|>, nothing in between; the generation prompt is <|assistant|>
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and not os.path.isfile(os.path.join(path, "state.json"))


# ------------------------------------------------------------------------------------------------ configs

def to_hf_config(cfg: ModelConfig, special_ids: dict[str, int]) -> dict:
    """The keyword arguments of the transformers config (LlamaConfig, MixtralConfig, Qwen2MoeConfig) for our model.
    Their load-balancing loss is top_k times ours for the same routing (it counts each token k times), so its
    coefficient is ours / top_k. They have no z-loss: its coefficient is kept as router_z_loss_coef, for init_from."""
    config = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=cfg.init_std, bos_token_id=special_ids.get("bos"), eos_token_id=special_ids["eos"],
        pad_token_id=special_ids.get("pad"),
    )
    moe = cfg.moe
    if hf_class(cfg) == "MixtralForCausalLM":
        for key in ("attention_bias", "mlp_bias"):
            config.pop(key)
        config.update(intermediate_size=cfg.expert_hidden, num_local_experts=moe.experts, num_experts_per_tok=moe.top_k,
                      router_aux_loss_coef=moe.aux_loss_coef / moe.top_k, router_z_loss_coef=moe.z_loss_coef,
                      sliding_window=None)
    elif hf_class(cfg) == "Qwen2MoeForCausalLM":
        for key in ("attention_bias", "mlp_bias", "head_dim"):
            config.pop(key)
        config.update(num_experts=moe.experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=cfg.expert_hidden,
                      shared_expert_intermediate_size=moe.shared_experts * cfg.expert_hidden,
                      decoder_sparse_step=moe.every, mlp_only_layers=[], norm_topk_prob=True, qkv_bias=False,
                      use_sliding_window=False, router_aux_loss_coef=moe.aux_loss_coef / moe.top_k,
                      router_z_loss_coef=moe.z_loss_coef)
    return config


def read_hf_config(path: str) -> dict:
    file = os.path.join(path, CONFIG)
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: unreadable ({e})") from None


def model_config(path: str) -> ModelConfig:
    """Our ModelConfig for a transformers Llama directory; anything our model cannot compute is refused by key."""
    hf = read_hf_config(path)
    where = os.path.join(path, CONFIG)
    if hf.get("model_type") not in ("llama", "mixtral", "qwen2_moe"):
        raise UserError(f"{where}: model_type {hf.get('model_type')!r}: only Llama, Mixtral and Qwen2-MoE models can "
                        "be imported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {  # key: (its value, whether our model cannot compute it)
        "hidden_act": (hf.get("hidden_act"), hf.get("hidden_act", "silu") != "silu"),
        "attention_bias": (hf.get("attention_bias"), bool(hf.get("attention_bias"))),
        "mlp_bias": (hf.get("mlp_bias"), bool(hf.get("mlp_bias"))),
        "rope_type": (rope_type, rope_type != "default"),
        "pretraining_tp": (hf.get("pretraining_tp"), hf.get("pretraining_tp", 1) not in (1, None)),
        "sliding_window": (hf.get("sliding_window"), hf.get("model_type") == "mixtral" and hf.get("sliding_window")
                           is not None and hf["sliding_window"] < hf.get("max_position_embeddings", 0)),
        "use_sliding_window": (True, bool(hf.get("use_sliding_window"))),
        "qkv_bias": (hf.get("qkv_bias"), hf.get("model_type") == "qwen2_moe" and hf.get("qkv_bias", True)),
        "norm_topk_prob": (hf.get("norm_topk_prob"), hf.get("model_type") == "qwen2_moe" and
                           not hf.get("norm_topk_prob", False)),
        "mlp_only_layers": (hf.get("mlp_only_layers"), bool(hf.get("mlp_only_layers"))),
    }
    for key, (value, bad) in unsupported.items():
        if bad:
            raise UserError(f"{where}: {key}={value!r} is not supported by our model")
    try:
        heads = hf["num_attention_heads"]
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02), moe=moe_config(hf),
        )
    except KeyError as e:
        raise UserError(f"{where}: no {e.args[0]!r}") from None
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise UserError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads "
                        f"({cfg.head_dim}), which our model requires")
    if problems := cfg.validate():
        raise UserError(f"{where}: {problems[0]}")
    return cfg


def moe_config(hf: dict) -> MoEConfig:
    """model.moe of a transformers config (KeyError for a missing key)."""
    kind = hf.get("model_type")
    if kind == "llama":
        return MoEConfig()
    top_k = hf["num_experts_per_tok"]
    aux = float(hf.get("router_aux_loss_coef", 0.001)) * top_k  # theirs counts each token k times
    z = float(hf.get("router_z_loss_coef", 0.0))
    if kind == "mixtral":
        return MoEConfig(experts=hf["num_local_experts"], top_k=top_k, aux_loss_coef=aux, z_loss_coef=z)
    hidden, shared = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"]
    if shared % hidden:
        raise UserError(f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size={hidden}, "
                        "as our shared experts are")
    return MoEConfig(experts=hf["num_experts"], top_k=top_k, shared_experts=shared // hidden,
                     every=hf.get("decoder_sparse_step", 1), expert_hidden=hidden, aux_loss_coef=aux, z_loss_coef=z)


# ------------------------------------------------------------------------------------------------ weights

def _rope_layout(name: str, w: torch.Tensor, cfg: ModelConfig, to_hf: bool) -> torch.Tensor:
    """The query/key projections, rows reordered per head between interleaved pairs (ours) and halves (theirs);
    every other weight unchanged."""
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.kv_heads}.get(name)
    if heads is None:
        return w
    rows, cols = w.shape
    pairs = (rows // heads // 2, 2) if to_hf else (2, rows // heads // 2)
    return w.reshape(heads, *pairs, cols).transpose(1, 2).reshape(rows, cols).contiguous()


# an MoE block's feed-forward: ours → transformers' module state (in memory); the experts' w1 and w3 are stacked
# as one gate_up_proj
MOE_NAMES = {
    "feed_forward.router.weight": "mlp.gate.weight",
    "feed_forward.shared.w1.weight": "mlp.shared_expert.gate_proj.weight",
    "feed_forward.shared.w3.weight": "mlp.shared_expert.up_proj.weight",
    "feed_forward.shared.w2.weight": "mlp.shared_expert.down_proj.weight",
    "feed_forward.shared_gate.weight": "mlp.shared_expert_gate.weight",
}


def _layer_names(cfg: ModelConfig, i: int) -> dict[str, str]:
    if not cfg.is_moe(i):
        return LAYER_NAMES
    names = {k: v for k, v in LAYER_NAMES.items() if not k.startswith("feed_forward.")}
    return names | {k: v for k, v in MOE_NAMES.items() if cfg.moe.shared_experts or ".shared" not in k}


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Ours → the state dict of the transformers module in memory (hf_class)."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _layer_names(cfg, i).items():
            out[f"model.layers.{i}.{theirs}"] = _rope_layout(ours, state[f"layers.{i}.{ours}"], cfg, to_hf=True)
        if cfg.is_moe(i):
            ff = f"layers.{i}.feed_forward"
            out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([state[f"{ff}.w1"], state[f"{ff}.w3"]], dim=1)
            out[f"model.layers.{i}.mlp.experts.down_proj"] = state[f"{ff}.w2"]
            if not cfg.moe.shared_experts and hf_class(cfg) == "Qwen2MoeForCausalLM":  # its shared expert, empty
                for ours, theirs in MOE_NAMES.items():
                    if ".shared." in ours:
                        rows, cols = (cfg.dim, 0) if ours.endswith("w2.weight") else (0, cfg.dim)
                        out[f"model.layers.{i}.{theirs}"] = torch.zeros(rows, cols)
                out[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
    return out


# one tensor per expert, as transformers (and the published Mixtral and Qwen-MoE checkpoints) store them
STORED_EXPERT = re.compile(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                           r"(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")


def stacked_experts(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stored Mixtral or Qwen2-MoE state dict with its experts stacked as transformers holds them in memory
    (block_sparse_moe is called mlp there); other tensors unchanged."""
    out, experts = {}, {}
    for name, tensor in hf.items():
        match = STORED_EXPERT.fullmatch(name)
        if match is None:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
            continue
        layer, e, kind = match.groups()
        kind = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(kind, kind)
        experts.setdefault((layer, kind), {})[int(e)] = tensor
    for (layer, kind), by_index in experts.items():
        stacked = torch.stack([by_index[e] for e in sorted(by_index)])
        experts[layer, kind] = stacked
    for layer in {layer for layer, _ in experts}:
        if (layer, "gate_proj") in experts and (layer, "up_proj") in experts:
            out[f"{layer}.mlp.experts.gate_up_proj"] = torch.cat([experts[layer, "gate_proj"], experts[layer, "up_proj"]], 1)
        if (layer, "down_proj") in experts:
            out[f"{layer}.mlp.experts.down_proj"] = experts[layer, "down_proj"]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    def take(name):
        if name not in hf:
            raise UserError(f"{where}: no tensor {name!r}")
        return hf[name]

    state = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    state["output.weight"] = state["tok_embeddings.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    for i in range(cfg.n_layers):
        for ours, theirs in _layer_names(cfg, i).items():
            state[f"layers.{i}.{ours}"] = _rope_layout(ours, take(f"model.layers.{i}.{theirs}"), cfg, to_hf=False)
        if cfg.is_moe(i):
            gate_up = take(f"model.layers.{i}.mlp.experts.gate_up_proj")
            ff = f"layers.{i}.feed_forward"
            state[f"{ff}.w1"], state[f"{ff}.w3"] = gate_up.chunk(2, dim=1)
            state[f"{ff}.w2"] = take(f"model.layers.{i}.mlp.experts.down_proj")
    return state


def weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise UserError(f"{path}: no model.safetensors (or model.safetensors.index.json); save the model with "
                    "safetensors (transformers' default)")


def load_state_dict(path: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) from a transformers Llama directory."""
    from safetensors.torch import load_file

    hf = {}
    for file in weight_files(path):
        try:
            hf.update(load_file(file))
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"{file}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    state = from_hf_state_dict(stacked_experts(hf), cfg, path)
    return {k: v.float().contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- tokenizer

def bpe_merges(sp) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and the merge list of a sentencepiece BPE model: every way of writing a piece as two pieces,
    ranked by the merged piece's id (sentencepiece merges by piece score, which falls with the id)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    mergeable = {p: i for p, i in vocab.items()
                 if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for piece, _ in sorted(mergeable.items(), key=lambda item: item[1]):
        splits = [(mergeable[piece[:k]], mergeable[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in mergeable and piece[k:] in mergeable]
        merges += [(left, right) for *_, left, right in sorted(splits)]
    return vocab, merges


def sentencepiece_spec(sp_path: str) -> dict:
    """What decides how a sentencepiece BPE model splits text, read from its protobuf; what a transformers
    tokenizer cannot reproduce exactly is refused by name."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(sp_path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    unsupported = {  # key: (its value, whether it is unsupported)
        "model_type": (pb.TrainerSpec.ModelType.Name(trainer.model_type), trainer.model_type != pb.TrainerSpec.BPE),
        "normalization_rule_name": (normalizer.name, normalizer.name not in ("identity", "")
                                    or bool(normalizer.precompiled_charsmap)),
        "remove_extra_whitespaces": (True, normalizer.remove_extra_whitespaces),
        "treat_whitespace_as_suffix": (True, trainer.treat_whitespace_as_suffix),
    }
    for key, (value, bad) in unsupported.items():
        if bad:
            raise UserError(f"{sp_path}: sentencepiece {key}={value!r} cannot be exported as a transformers tokenizer "
                            "(BPE with identity normalisation only)")
    return {"dummy_prefix": normalizer.add_dummy_prefix, "whitespace_only_pieces": trainer.allow_whitespace_only_pieces,
            "split_by_whitespace": trainer.split_by_whitespace, "byte_fallback": trainer.byte_fallback}


def hf_tokenizer(sp_path: str):
    """A transformers fast tokenizer that gives the ids of a sentencepiece BPE model with identity normalisation
    (ours, or e.g. Llama 2's), with the chat template and its role markers as special tokens when it has them."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from preprocess.tokenizer import CONTROL_SYMBOLS, load_tokenizer

    info = load_tokenizer(sp_path)
    spec = sentencepiece_spec(sp_path)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    vocab, merges = bpe_merges(sp)
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=spec["byte_fallback"]))
    # As sentencepiece: spaces become "▁" (and one is put in front when the model adds a dummy prefix); then the
    # text is cut into words, each starting at a "▁" — a run of them stays together when whitespace-only pieces
    # are allowed — and merges never cross a word.
    replace = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *replace] if spec["dummy_prefix"] else replace)
    if spec["split_by_whitespace"]:
        words = "▁*[^▁]+|▁+" if spec["whitespace_only_pieces"] else "▁[^▁]*|[^▁]+"
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(words), behavior="isolated")
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*decode, decoders.Strip(" ", 1, 0)] if spec["dummy_prefix"] else decode)
    chat = [t for t in CONTROL_SYMBOLS if t in info.special_ids]
    names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token"}
    special = {names[k]: sp.id_to_piece(v) for k, v in info.special_ids.items() if k in names}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special, additional_special_tokens=chat,
                                   chat_template=CHAT_TEMPLATE if len(chat) == 4 else None,
                                   clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def hf_json_tokenizer(info):
    """A transformers fast tokenizer on a run's own tokenizer.json, with its eos (and bos) named."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(info.path)
    names = {key: tok.id_to_token(info.special_ids[key]) for key in ("eos", "bos") if key in info.special_ids}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in names.items()})
