"""transformers model families ↔ our Transformer: each family's config and state-dict mapping, in one object per
family (the seam through which a family is added), and reading a transformers directory.

Families: Llama (a dense model), Mixtral (every block MoE, no shared expert) and Qwen2-MoE (dense blocks between
every model.moe.every-th, a sigmoid-gated shared expert or none; qkv_bias=False). The MoE families route as ours:
softmax, top-k, the k weights renormalised. On disk their experts are one tensor per expert; in memory
transformers 5 stacks them as ours does.

The models compute the same function; they differ in names and in one layout: our rotary embedding turns
interleaved pairs (x0, x1), (x2, x3), … of each head, transformers' turns the two halves (x_i, x_{i+d/2}). The
query and key projections are permuted row-wise between the layouts, which is exact.

Anything a transformers config asks that our model does not compute is refused by key, never loaded approximately.
Reading a transformers directory needs only safetensors; writing one (training.export_hf) needs transformers.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file

from preprocess.errors import UserError

from .transformer import ModelConfig, MoEConfig

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

# an MoE block's feed-forward: ours → transformers' module state (in memory); the experts' w1 and w3 are stacked
# as one gate_up_proj
MOE_NAMES = {
    "feed_forward.router.weight": "mlp.gate.weight",
    "feed_forward.shared.w1.weight": "mlp.shared_expert.gate_proj.weight",
    "feed_forward.shared.w3.weight": "mlp.shared_expert.up_proj.weight",
    "feed_forward.shared.w2.weight": "mlp.shared_expert.down_proj.weight",
    "feed_forward.shared_gate.weight": "mlp.shared_expert_gate.weight",
}

# one tensor per expert, as transformers (and the published Mixtral and Qwen-MoE checkpoints) store them
STORED_EXPERT = re.compile(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                           r"(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")


def rope_layout(name: str, w: torch.Tensor, cfg: ModelConfig, to_hf: bool) -> torch.Tensor:
    """The query/key projections, rows reordered per head between interleaved pairs (ours) and halves (theirs);
    every other weight unchanged."""
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.kv_heads}.get(name)
    if heads is None:
        return w
    rows, cols = w.shape
    pairs = (rows // heads // 2, 2) if to_hf else (2, rows // heads // 2)
    return w.reshape(heads, *pairs, cols).transpose(1, 2).reshape(rows, cols).contiguous()


class Llama:
    """LlamaForCausalLM: the dense model, and the base of the others' mappings."""
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    name = "Llama"

    def holds(self, cfg: ModelConfig) -> bool:
        """Whether this family computes our model of this shape."""
        return not cfg.moe.experts

    # ------------------------------------------------------------------------------------------ configs
    def to_hf_config(self, cfg: ModelConfig, special_ids: dict[str, int]) -> dict:
        """The keyword arguments of the family's transformers config for our model."""
        return dict(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
            initializer_range=cfg.init_std, bos_token_id=special_ids.get("bos"), eos_token_id=special_ids["eos"],
            pad_token_id=special_ids.get("pad"),
        )

    def unsupported(self, hf: dict) -> dict[str, tuple[object, bool]]:
        """key: (its value, whether our model cannot compute it)."""
        rope_type = rope_parameters(hf).get("rope_type", rope_parameters(hf).get("type", "default"))
        return {
            "hidden_act": (hf.get("hidden_act"), hf.get("hidden_act", "silu") != "silu"),
            "attention_bias": (hf.get("attention_bias"), bool(hf.get("attention_bias"))),
            "mlp_bias": (hf.get("mlp_bias"), bool(hf.get("mlp_bias"))),
            "rope_type": (rope_type, rope_type != "default"),
            "pretraining_tp": (hf.get("pretraining_tp"), hf.get("pretraining_tp", 1) not in (1, None)),
            "use_sliding_window": (True, bool(hf.get("use_sliding_window"))),
            "mlp_only_layers": (hf.get("mlp_only_layers"), bool(hf.get("mlp_only_layers"))),
        }

    def moe_config(self, hf: dict) -> MoEConfig:
        """model.moe of a transformers config (KeyError for a missing key)."""
        return MoEConfig()

    def model_config(self, hf: dict, where: str) -> ModelConfig:
        """Our ModelConfig for a config of this family; anything our model cannot compute is refused by key."""
        for key, (value, bad) in self.unsupported(hf).items():
            if bad:
                raise UserError(f"{where}: {key}={value!r} is not supported by our model")
        try:
            heads = hf["num_attention_heads"]
            rope = rope_parameters(hf)
            cfg = ModelConfig(
                vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
                n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
                max_seq_len=hf["max_position_embeddings"],
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                init_std=hf.get("initializer_range", 0.02), moe=self.moe_config(hf),
            )
        except KeyError as e:
            raise UserError(f"{where}: no {e.args[0]!r}") from None
        if hf.get("head_dim") not in (None, cfg.head_dim):
            raise UserError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads "
                            f"({cfg.head_dim}), which our model requires")
        if problems := cfg.validate():
            raise UserError(f"{where}: {problems[0]}")
        return cfg

    # ------------------------------------------------------------------------------------------ weights
    def layer_names(self, cfg: ModelConfig, i: int) -> dict[str, str]:
        if not cfg.is_moe(i):
            return LAYER_NAMES
        names = {k: v for k, v in LAYER_NAMES.items() if not k.startswith("feed_forward.")}
        return names | {k: v for k, v in MOE_NAMES.items() if cfg.moe.shared_experts or ".shared" not in k}

    def to_hf_state_dict(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Ours → the state dict of the transformers module in memory."""
        out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = state["output.weight"]
        for i in range(cfg.n_layers):
            for ours, theirs in self.layer_names(cfg, i).items():
                out[f"model.layers.{i}.{theirs}"] = rope_layout(ours, state[f"layers.{i}.{ours}"], cfg, to_hf=True)
            if cfg.is_moe(i):
                ff = f"layers.{i}.feed_forward"
                out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([state[f"{ff}.w1"], state[f"{ff}.w3"]],
                                                                              dim=1)
                out[f"model.layers.{i}.mlp.experts.down_proj"] = state[f"{ff}.w2"]
                out.update(self.extra_layer_state(cfg, i))
        return out

    def extra_layer_state(self, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
        """Tensors the family's MoE block has and ours does not."""
        return {}

    def from_hf_state_dict(self, hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
        """The state dict of the transformers module (experts stacked, see stacked_experts) → ours."""
        def take(name):
            if name not in hf:
                raise UserError(f"{where}: no tensor {name!r}")
            return hf[name]

        state = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
        state["output.weight"] = state["tok_embeddings.weight"] if cfg.tie_embeddings else take("lm_head.weight")
        for i in range(cfg.n_layers):
            for ours, theirs in self.layer_names(cfg, i).items():
                state[f"layers.{i}.{ours}"] = rope_layout(ours, take(f"model.layers.{i}.{theirs}"), cfg, to_hf=False)
            if cfg.is_moe(i):
                gate_up = take(f"model.layers.{i}.mlp.experts.gate_up_proj")
                ff = f"layers.{i}.feed_forward"
                state[f"{ff}.w1"], state[f"{ff}.w3"] = gate_up.chunk(2, dim=1)
                state[f"{ff}.w2"] = take(f"model.layers.{i}.mlp.experts.down_proj")
        return state


class Mixtral(Llama):
    """MixtralForCausalLM: every block MoE, no shared expert. Its load-balancing loss is top_k times ours for the same
    routing (it counts each token k times), so its coefficient is ours / top_k. It has no z-loss: the coefficient is
    kept as router_z_loss_coef, for init_from."""
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    name = "Mixtral"

    def holds(self, cfg: ModelConfig) -> bool:
        return bool(cfg.moe.experts) and cfg.moe.every == 1 and not cfg.moe.shared_experts

    def to_hf_config(self, cfg: ModelConfig, special_ids: dict[str, int]) -> dict:
        config = super().to_hf_config(cfg, special_ids)
        for key in ("attention_bias", "mlp_bias"):
            config.pop(key)
        moe = cfg.moe
        config.update(intermediate_size=cfg.expert_hidden, num_local_experts=moe.experts, num_experts_per_tok=moe.top_k,
                      router_aux_loss_coef=moe.aux_loss_coef / moe.top_k, router_z_loss_coef=moe.z_loss_coef,
                      sliding_window=None)
        return config

    def unsupported(self, hf: dict) -> dict[str, tuple[object, bool]]:
        window = hf.get("sliding_window")
        return {**super().unsupported(hf),
                "sliding_window": (window, window is not None and window < hf.get("max_position_embeddings", 0))}

    def moe_config(self, hf: dict) -> MoEConfig:
        top_k = hf["num_experts_per_tok"]
        return MoEConfig(experts=hf["num_local_experts"], top_k=top_k, aux_loss_coef=aux_loss_coef(hf, top_k),
                         z_loss_coef=float(hf.get("router_z_loss_coef", 0.0)))


class Qwen2Moe(Llama):
    """Qwen2MoeForCausalLM: MoE blocks every decoder_sparse_step-th, a sigmoid-gated shared expert (written empty,
    zero-size, when ours has none), no query/key/value biases."""
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    name = "Qwen2-MoE"

    def holds(self, cfg: ModelConfig) -> bool:
        return bool(cfg.moe.experts) and not Mixtral().holds(cfg)

    def to_hf_config(self, cfg: ModelConfig, special_ids: dict[str, int]) -> dict:
        config = super().to_hf_config(cfg, special_ids)
        for key in ("attention_bias", "mlp_bias", "head_dim"):
            config.pop(key)
        moe = cfg.moe
        config.update(num_experts=moe.experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=cfg.expert_hidden,
                      shared_expert_intermediate_size=moe.shared_experts * cfg.expert_hidden,
                      decoder_sparse_step=moe.every, mlp_only_layers=[], norm_topk_prob=True, qkv_bias=False,
                      use_sliding_window=False, router_aux_loss_coef=moe.aux_loss_coef / moe.top_k,
                      router_z_loss_coef=moe.z_loss_coef)
        return config

    def unsupported(self, hf: dict) -> dict[str, tuple[object, bool]]:
        return {**super().unsupported(hf),
                "qkv_bias": (hf.get("qkv_bias"), hf.get("qkv_bias", True)),
                "norm_topk_prob": (hf.get("norm_topk_prob"), not hf.get("norm_topk_prob", False))}

    def moe_config(self, hf: dict) -> MoEConfig:
        top_k = hf["num_experts_per_tok"]
        hidden, shared = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"]
        if shared % hidden:
            raise UserError(f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size="
                            f"{hidden}, as our shared experts are")
        return MoEConfig(experts=hf["num_experts"], top_k=top_k, shared_experts=shared // hidden,
                         every=hf.get("decoder_sparse_step", 1), expert_hidden=hidden,
                         aux_loss_coef=aux_loss_coef(hf, top_k), z_loss_coef=float(hf.get("router_z_loss_coef", 0.0)))

    def extra_layer_state(self, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
        if cfg.moe.shared_experts:
            return {}
        empty = {}  # its shared expert, of size zero
        for ours, theirs in MOE_NAMES.items():
            if ".shared." in ours:
                rows, cols = (cfg.dim, 0) if ours.endswith("w2.weight") else (0, cfg.dim)
                empty[f"model.layers.{i}.{theirs}"] = torch.zeros(rows, cols)
        empty[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
        return empty


FAMILIES = {family.model_type: family for family in (Llama(), Mixtral(), Qwen2Moe())}


def family_of(cfg: ModelConfig) -> Llama:
    """The transformers family that computes what our model of this shape does."""
    return next(family for family in FAMILIES.values() if family.holds(cfg))


def rope_parameters(hf: dict) -> dict:
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def aux_loss_coef(hf: dict, top_k: int) -> float:
    return float(hf.get("router_aux_loss_coef", 0.001)) * top_k  # theirs counts each token k times


# ------------------------------------------------------------------------------------------ directories

def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and not os.path.isfile(os.path.join(path, "state.json"))


def read_hf_config(path: str) -> dict:
    file = os.path.join(path, CONFIG)
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: unreadable ({e})") from None


def family_of_dir(path: str) -> tuple[Llama, dict]:
    """(the family, the config) of a transformers directory; a model_type we do not compute is refused."""
    hf = read_hf_config(path)
    family = FAMILIES.get(hf.get("model_type"))
    if family is None:
        *others, last = [f.name for f in FAMILIES.values()]
        names = f"{', '.join(others)} and {last}"
        raise UserError(f"{os.path.join(path, CONFIG)}: model_type {hf.get('model_type')!r}: only {names} models can "
                        "be imported")
    return family, hf


def model_config(path: str) -> ModelConfig:
    """Our ModelConfig for a transformers directory."""
    family, hf = family_of_dir(path)
    return family.model_config(hf, os.path.join(path, CONFIG))


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


def load_state_dict(path: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) from a transformers directory."""
    family, _ = family_of_dir(path)
    hf = {}
    for file in weight_files(path):
        try:
            hf.update(load_file(file))
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"{file}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    state = family.from_hf_state_dict(stacked_experts(hf), cfg, path)
    return {k: v.float().contiguous() for k, v in state.items()}
