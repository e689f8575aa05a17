"""transformers model families ↔ our Transformer: each family's config and tensor names, in one object per family
(the seam through which a family is added), and reading a transformers directory.

Families: Llama (3.x rope scaling, tied embeddings), Mistral (a sliding window on every layer), Qwen2 (q/k/v
biases), Qwen3 (q/k norms, a head size of its own), Gemma 3 text (GeGLU, (1 + w) norms before and after attention
and the feed-forward, √dim-scaled embeddings, sliding layers with their own rotary base, query_pre_attn_scalar),
and the mixtures of experts Mixtral (every block MoE), Qwen2-MoE (dense blocks between, a sigmoid-gated shared
expert) and Qwen3-MoE (no shared expert, dense mlp_only_layers). The MoE families route as ours: softmax, top-k,
the k weights renormalised or not (norm_topk_prob). On disk their experts are one tensor per expert; in memory
transformers 5 stacks them as ours does.

A family reads its config into our ModelConfig (model_config) and writes ours back (to_hf_config); a model of
ours belongs to the family it was imported from (ModelConfig.family) or, when we trained it from scratch, to the
first family whose config expresses it exactly (the round trip gives it back).

The models compute the same function; they differ in names and in one layout: our rotary embedding turns
interleaved pairs (x0, x1), (x2, x3), … of each head, transformers' turns the two halves (x_i, x_{i+d/2}). The
query and key projections (and their biases and norms) are permuted between the layouts, which is exact.

Anything a transformers config asks that our model does not compute is refused by key, never loaded approximately.
Reading a transformers directory needs only safetensors, one tensor at a time, each process reading what it holds
(load_into); writing one
(training.export_hf) needs transformers.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors import SafetensorError, safe_open

from preprocess.errors import UserError

from .storage import held
from .transformer import ModelConfig, MoEConfig

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
FULL, SLIDING = "full_attention", "sliding_attention"
COPY_BYTES = 64 << 20  # a stored tensor is copied into the model in row blocks of about this size

# one tensor per expert, as transformers (and the published Mixtral and Qwen-MoE checkpoints) store them, or all of
# a layer's stacked, as transformers 5 holds them in memory (block_sparse_moe is Mixtral's name for mlp)
STORED_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")
STACKED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
EXPERT_WEIGHT = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2"}


def layer_names(cfg: ModelConfig, i: int) -> dict[str, tuple[str, int]]:
    """Our tensors of block i → (transformers' name, the heads whose rows follow the rotary layout; 0: none). The
    stacked experts of an MoE block are not listed (see expert_placements)."""
    names = {
        "attention_norm.weight": ("input_layernorm.weight", 0),
        "attention.wq.weight": ("self_attn.q_proj.weight", cfg.n_heads),
        "attention.wk.weight": ("self_attn.k_proj.weight", cfg.kv_heads),
        "attention.wv.weight": ("self_attn.v_proj.weight", 0),
        "attention.wo.weight": ("self_attn.o_proj.weight", 0),
    }
    if cfg.qkv_bias:
        names |= {"attention.wq.bias": ("self_attn.q_proj.bias", cfg.n_heads),
                  "attention.wk.bias": ("self_attn.k_proj.bias", cfg.kv_heads),
                  "attention.wv.bias": ("self_attn.v_proj.bias", 0)}
    if cfg.qk_norm:  # one norm per head size, shared by the heads: its entries follow the layout of one head
        names |= {"attention.q_norm.weight": ("self_attn.q_norm.weight", 1),
                  "attention.k_norm.weight": ("self_attn.k_norm.weight", 1)}
    if cfg.sandwich_norm:  # Gemma 3: post_attention_layernorm is the attention's output norm
        names |= {"attention_out_norm.weight": ("post_attention_layernorm.weight", 0),
                  "ffn_norm.weight": ("pre_feedforward_layernorm.weight", 0),
                  "ffn_out_norm.weight": ("post_feedforward_layernorm.weight", 0)}
    else:
        names["ffn_norm.weight"] = ("post_attention_layernorm.weight", 0)
    if not cfg.is_moe(i):
        return names | {"feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
                        "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
                        "feed_forward.w2.weight": ("mlp.down_proj.weight", 0)}
    names["feed_forward.router.weight"] = ("mlp.gate.weight", 0)
    if cfg.moe.shared_experts:
        names |= {"feed_forward.shared.w1.weight": ("mlp.shared_expert.gate_proj.weight", 0),
                  "feed_forward.shared.w3.weight": ("mlp.shared_expert.up_proj.weight", 0),
                  "feed_forward.shared.w2.weight": ("mlp.shared_expert.down_proj.weight", 0),
                  "feed_forward.shared_gate.weight": ("mlp.shared_expert_gate.weight", 0)}
    return names


def tensor_names(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """Every tensor of ours but the stacked experts → (transformers' name, heads of the rotary layout)."""
    names = {"tok_embeddings.weight": ("model.embed_tokens.weight", 0), "norm.weight": ("model.norm.weight", 0)}
    if not cfg.tie_embeddings:
        names["output.weight"] = ("lm_head.weight", 0)
    for i in range(cfg.n_layers):
        names |= {f"layers.{i}.{ours}": (f"model.layers.{i}.{theirs}", heads)
                  for ours, (theirs, heads) in layer_names(cfg, i).items()}
    return names


def rope_layout(w: torch.Tensor, heads: int, to_hf: bool) -> torch.Tensor:
    """The first dimension of a query/key tensor (weight rows, bias, norm), reordered per head between interleaved
    pairs (ours) and halves (theirs); heads=0: unchanged."""
    if not heads:
        return w
    pairs = (w.shape[0] // heads // 2, 2) if to_hf else (2, w.shape[0] // heads // 2)
    return w.reshape(heads, *pairs, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def rope_parameters_of(cfg: ModelConfig) -> dict:
    """Our rotary settings as transformers' rope_parameters (of the full-attention layers)."""
    params = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        params["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        params |= dict(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                       original_max_position_embeddings=cfg.rope_original_context)
    return params


def rope_fields(params: dict, where: str) -> dict:
    """transformers' rope parameters (of one kind of layer) → our ModelConfig fields."""
    kind = params.get("rope_type", params.get("type", "default"))
    for key, default in (("partial_rotary_factor", 1.0), ("attention_factor", 1.0)):
        if params.get(key, default) not in (default, None):
            raise UserError(f"{where}: rope {key}={params[key]!r} is not supported by our model")
    fields = {"rope_theta": float(params.get("rope_theta", 10000.0))}
    if kind == "default":
        return fields
    if kind not in ("linear", "llama3"):
        raise UserError(f"{where}: rope_type={kind!r} is not supported by our model (default, linear and llama3 are)")
    fields |= {"rope_scaling": kind, "rope_factor": float(params["factor"])}
    if kind == "llama3":
        fields |= {"rope_low_freq_factor": float(params["low_freq_factor"]),
                   "rope_high_freq_factor": float(params["high_freq_factor"]),
                   "rope_original_context": int(params["original_max_position_embeddings"])}
    return fields


class Llama:
    """LlamaForCausalLM (Llama 3.x, SmolLM2): the dense model, and the base of the other families."""
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    name = "Llama"
    activation = ("hidden_act", "silu")  # the config key of the feed-forward's activation, and the one we compute
    window_on_every_layer = False  # sliding_window, when set, applies to every layer (no layer_types)
    # what the family's config class takes for a key a config.json leaves out (where ours would differ)
    defaults = {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}

    # ------------------------------------------------------------------------------------------ configs
    def get(self, hf: dict, key: str):
        """A config key, or the family's default when the file leaves it out (a null stays null)."""
        return hf.get(key, self.defaults.get(key))

    def unsupported(self, hf: dict) -> dict[str, tuple[object, bool]]:
        """key: (its value, whether our model cannot compute it)."""
        key, ours = self.activation
        return {key: (hf.get(key), hf.get(key, ours) != ours),
                "quantization_config": (hf.get("quantization_config", {}).get("quant_method", "set")
                                        if isinstance(hf.get("quantization_config"), dict) else None,
                                        "quantization_config" in hf),
                **self.refused(hf)}

    def refused(self, hf: dict) -> dict[str, tuple[object, bool]]:
        """The family's own keys our model cannot compute."""
        return {"attention_bias": (hf.get("attention_bias"), bool(hf.get("attention_bias"))),
                "mlp_bias": (hf.get("mlp_bias"), bool(hf.get("mlp_bias"))),
                "pretraining_tp": (hf.get("pretraining_tp"), hf.get("pretraining_tp", 1) not in (1, None))}

    def rope(self, hf: dict, layer_type: str) -> dict:
        """The rope parameters of one kind of layer: transformers 5's rope_parameters (per layer type or one for
        all), or a config.json of an older transformers (rope_theta, rope_scaling); a base left out is the
        top-level rope_theta's, else the family's default."""
        params = hf.get("rope_parameters")
        if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        elif not params:
            params = self.legacy_rope(hf, layer_type)
        return {"rope_theta": hf.get("rope_theta", self.default_theta(layer_type)), **params}

    def legacy_rope(self, hf: dict, layer_type: str) -> dict:
        return dict(hf.get("rope_scaling") or {})

    def default_theta(self, layer_type: str) -> float:
        return self.defaults["rope_theta"]

    def layer_types(self, hf: dict) -> list[str]:
        """Each layer's attention, for a config that does not list them."""
        return [FULL] * hf["num_hidden_layers"]

    def sliding(self, hf: dict, where: str) -> tuple[int, list[int]]:
        """(the window, the layers that attend within it)."""
        window = self.get(hf, "sliding_window") or 0
        if not isinstance(window, int) or window < 0:
            raise UserError(f"{where}: sliding_window={window!r} is not a number of positions")
        if self.window_on_every_layer:
            return window, list(range(hf["num_hidden_layers"])) if window else []
        types = hf.get("layer_types") or self.layer_types(hf)
        if unknown := sorted(set(types) - {FULL, SLIDING}):
            raise UserError(f"{where}: layer_types {unknown[0]!r} is not supported by our model")
        layers = [i for i, kind in enumerate(types) if kind == SLIDING]
        return (window, layers) if window and layers else (0, [])

    def moe_config(self, hf: dict) -> MoEConfig:
        """model.moe of a transformers config (KeyError for a missing key)."""
        return MoEConfig()

    def fields(self, hf: dict, where: str) -> dict:
        """ModelConfig's fields for a config of this family (KeyError for a missing key)."""
        heads, dim = hf["num_attention_heads"], hf["hidden_size"]
        head_dim = self.get(hf, "head_dim") or dim // heads
        window, sliding = self.sliding(hf, where)
        return dict(
            vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"], norm_eps=self.get(hf, "rms_norm_eps"),
            tie_embeddings=bool(self.get(hf, "tie_word_embeddings")),
            init_std=hf.get("initializer_range", 0.02), moe=self.moe_config(hf),
            head_size=0 if dim % heads == 0 and head_dim == dim // heads else head_dim,
            sliding_window=window, sliding_layers=sliding, family=self.model_type,
            **rope_fields(self.rope(hf, FULL), where))

    def model_config(self, hf: dict, where: str) -> ModelConfig:
        """Our ModelConfig for a config of this family; anything our model cannot compute is refused by key."""
        if not isinstance(hf, dict):
            raise UserError(f"{where}: not a JSON object")
        for key, (value, bad) in self.unsupported(hf).items():
            if bad:
                raise UserError(f"{where}: {key}={value!r} is not supported by our model")
        try:
            cfg = ModelConfig(**self.fields(hf, where))
        except KeyError as e:
            raise UserError(f"{where}: no {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:  # a key of the wrong type or a zero size
            raise UserError(f"{where}: a value our model cannot read ({e})") from None
        if problems := cfg.validate():
            raise UserError(f"{where}: {problems[0]}")
        return cfg

    def to_hf_config(self, cfg: ModelConfig, special_ids: dict[str, int]) -> dict:
        """The keyword arguments of the family's transformers config for our model."""
        return dict(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            rope_parameters=rope_parameters_of(cfg), tie_word_embeddings=cfg.tie_embeddings,
            initializer_range=cfg.init_std, bos_token_id=special_ids.get("bos"), eos_token_id=special_ids["eos"],
            pad_token_id=special_ids.get("pad")) | {self.activation[0]: self.activation[1]} | self.own_hf_config(cfg)

    def own_hf_config(self, cfg: ModelConfig) -> dict:
        """What only this family's config says."""
        return dict(attention_bias=False, mlp_bias=False)

    def round_trip(self, cfg: ModelConfig) -> ModelConfig | None:
        """Our model written as this family's config and read back (None when the family refuses it)."""
        try:
            return self.model_config(self.to_hf_config(cfg, {"eos": 0}), self.name)
        except (UserError, KeyError):
            return None

    def holds(self, cfg: ModelConfig) -> bool:
        """Whether this family's config expresses our model exactly: written as its config and read back, it
        computes the same function."""
        back = self.round_trip(cfg)
        return back is not None and computed(back) == computed(cfg)

    # ------------------------------------------------------------------------------------------ weights
    def to_hf_state_dict(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Ours → the state dict of the transformers module in memory (experts stacked)."""
        out = {theirs: rope_layout(state[ours], heads, to_hf=True) for ours, (theirs, heads) in tensor_names(cfg).items()}
        for i in range(cfg.n_layers):
            if cfg.is_moe(i):
                ff = f"layers.{i}.feed_forward"
                out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([state[f"{ff}.w1"], state[f"{ff}.w3"]], 1)
                out[f"model.layers.{i}.mlp.experts.down_proj"] = state[f"{ff}.w2"]
                out.update(self.extra_layer_state(cfg, i))
        return out

    def extra_layer_state(self, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
        """Tensors the family's MoE block has and ours does not."""
        return {}


def window_of_every_layer(cfg: ModelConfig) -> int | None:
    """sliding_window of a family whose window applies to every layer (Mistral, Mixtral, Qwen3-MoE): ours when every
    layer slides, else None (a model with some sliding layers is not one of theirs: holds() sees it)."""
    return cfg.sliding_window if cfg.sliding_layers == list(range(cfg.n_layers)) else None


class Mistral(Llama):
    """MistralForCausalLM: Llama with a sliding window on every layer (none when sliding_window is null)."""
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    name = "Mistral"
    window_on_every_layer = True
    defaults = {**Llama.defaults, "sliding_window": 4096}

    def refused(self, hf: dict) -> dict[str, tuple[object, bool]]:
        return {}

    def own_hf_config(self, cfg: ModelConfig) -> dict:
        return dict(sliding_window=window_of_every_layer(cfg))


class Qwen2(Llama):
    """Qwen2ForCausalLM (Qwen2, Qwen2.5): biases on the query, key and value projections; sliding layers from
    max_window_layers on when use_sliding_window (no released model sets it)."""
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    name = "Qwen2"
    defaults = {**Llama.defaults, "sliding_window": 4096}

    def refused(self, hf: dict) -> dict[str, tuple[object, bool]]:
        return {}

    def layer_types(self, hf: dict) -> list[str]:
        n, first = hf["num_hidden_layers"], hf.get("max_window_layers", 28)
        return [SLIDING if hf.get("use_sliding_window") and i >= first else FULL for i in range(n)]

    def sliding(self, hf: dict, where: str) -> tuple[int, list[int]]:
        if not hf.get("use_sliding_window"):  # its sliding_window is then only the context it was trained for
            return 0, []
        return super().sliding(hf, where)

    def fields(self, hf: dict, where: str) -> dict:
        return super().fields(hf, where) | {"qkv_bias": True}

    def own_hf_config(self, cfg: ModelConfig) -> dict:
        if not cfg.sliding_layers:
            return dict(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        first = cfg.sliding_layers[0]  # the sliding layers must be the last ones (from max_window_layers on)
        return dict(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=first,
                    layer_types=[SLIDING if i >= first else FULL for i in range(cfg.n_layers)])


class Qwen3(Qwen2):
    """Qwen3ForCausalLM: RMSNorm of each head's queries and keys, a head size of its own, no biases."""
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    name = "Qwen3"
    defaults = {**Qwen2.defaults, "head_dim": 128}

    def refused(self, hf: dict) -> dict[str, tuple[object, bool]]:
        return {"attention_bias": (hf.get("attention_bias"), bool(hf.get("attention_bias")))}

    def fields(self, hf: dict, where: str) -> dict:
        return Llama.fields(self, hf, where) | {"qk_norm": True}

    def own_hf_config(self, cfg: ModelConfig) -> dict:
        return super().own_hf_config(cfg) | {"attention_bias": False}


class Gemma3(Llama):
    """Gemma3ForCausalLM (gemma3_text): √dim-scaled embeddings, RMSNorm as x̂·(1 + w), GeGLU with tanh GELU, q/k
    norms, norms before and after attention and the feed-forward, sliding layers with their own unscaled rotary
    base between full ones, scores scaled by query_pre_attn_scalar ** -0.5."""
    model_type = "gemma3_text"
    architecture = "Gemma3ForCausalLM"
    name = "Gemma 3"
    activation = ("hidden_activation", "gelu_pytorch_tanh")
    defaults = {"tie_word_embeddings": True, "rms_norm_eps": 1e-6, "sliding_window": 4096, "head_dim": 256,
                "query_pre_attn_scalar": 256}

    def refused(self, hf: dict) -> dict[str, tuple[object, bool]]:
        return {
            "hidden_act": (hf.get("hidden_act"), hf.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh"),
            "attention_bias": (hf.get("attention_bias"), bool(hf.get("attention_bias"))),
            "final_logit_softcapping": (hf.get("final_logit_softcapping"), hf.get("final_logit_softcapping") is not None),
            "attn_logit_softcapping": (hf.get("attn_logit_softcapping"), hf.get("attn_logit_softcapping") is not None),
            "use_bidirectional_attention": (True, bool(hf.get("use_bidirectional_attention"))),
        }

    def default_theta(self, layer_type: str) -> float:
        return 1_000_000.0 if layer_type == FULL else 10000.0

    def legacy_rope(self, hf: dict, layer_type: str) -> dict:
        """An older config.json: the full layers' rope_theta and rope_scaling, the sliding layers' own base."""
        if layer_type == FULL:
            return dict(hf.get("rope_scaling") or {})
        return {"rope_theta": hf.get("rope_local_base_freq", self.default_theta(SLIDING))}

    def layer_types(self, hf: dict) -> list[str]:
        every = hf.get("sliding_window_pattern", 6)
        return [SLIDING if (i + 1) % every else FULL for i in range(hf["num_hidden_layers"])]

    def fields(self, hf: dict, where: str) -> dict:
        fields = super().fields(hf, where)
        head_dim = self.get(hf, "head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        scalar = self.get(hf, "query_pre_attn_scalar")
        local = rope_fields(self.rope(hf, SLIDING), where)
        if fields["sliding_layers"] and len(local) > 1:
            raise UserError(f"{where}: rope scaling of the sliding layers is not supported by our model")
        # the sliding layers' own base, unless they compute as the full ones (the same base, unscaled)
        own = local["rope_theta"] != fields["rope_theta"] or fields.get("rope_scaling", "none") != "none"
        return fields | dict(qk_norm=True, norm_plus_one=True, sandwich_norm=True, embed_scale=True,
                             activation="gelu_tanh", attention_scale=0.0 if scalar == head_dim else float(scalar),
                             rope_local_theta=local["rope_theta"] if fields["sliding_layers"] and own else 0.0)

    def to_hf_config(self, cfg: ModelConfig, special_ids: dict[str, int]) -> dict:
        config = super().to_hf_config(cfg, special_ids)
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        config["rope_parameters"] = {FULL: config["rope_parameters"], SLIDING: local}
        return config

    def own_hf_config(self, cfg: ModelConfig) -> dict:
        return dict(attention_bias=False, final_logit_softcapping=None, attn_logit_softcapping=None,
                    query_pre_attn_scalar=integral(cfg.attention_scale or cfg.head_dim),
                    sliding_window=cfg.sliding_window or None,
                    layer_types=[SLIDING if cfg.window(i) else FULL for i in range(cfg.n_layers)])


class Mixtral(Llama):
    """MixtralForCausalLM: every block MoE, no shared expert. Its load-balancing loss is top_k times ours for the same
    routing (it counts each token k times), so its coefficient is ours / top_k. It has no z-loss: the coefficient is
    kept as router_z_loss_coef, for init_from."""
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    name = "Mixtral"
    window_on_every_layer = True
    defaults = {"tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0}

    def refused(self, hf: dict) -> dict[str, tuple[object, bool]]:
        return {}

    def own_hf_config(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        return dict(intermediate_size=cfg.expert_hidden, num_local_experts=moe.experts, num_experts_per_tok=moe.top_k,
                    router_aux_loss_coef=moe.aux_loss_coef / moe.top_k, router_z_loss_coef=moe.z_loss_coef,
                    sliding_window=window_of_every_layer(cfg))

    def moe_config(self, hf: dict) -> MoEConfig:
        top_k = hf["num_experts_per_tok"]
        return MoEConfig(experts=hf["num_local_experts"], top_k=top_k, aux_loss_coef=aux_loss_coef(hf, top_k),
                         z_loss_coef=float(hf.get("router_z_loss_coef", 0.0)))  # experts: intermediate_size


def qwen_moe_config(hf: dict, shared_experts: int = 0) -> MoEConfig:
    """model.moe of Qwen2-MoE and Qwen3-MoE: MoE blocks every decoder_sparse_step-th but mlp_only_layers,
    norm_topk_prob."""
    top_k = hf["num_experts_per_tok"]
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not isinstance(experts, int):
        raise KeyError("num_experts")
    if hf["moe_intermediate_size"] < 1:  # ours would read 0 as "the dense size"
        raise ValueError(f"moe_intermediate_size={hf['moe_intermediate_size']} must be positive")
    return MoEConfig(experts=experts, top_k=top_k, shared_experts=shared_experts,
                     every=hf.get("decoder_sparse_step", 1), expert_hidden=hf["moe_intermediate_size"],
                     renormalize=bool(hf.get("norm_topk_prob", False)),
                     dense_layers=list(hf.get("mlp_only_layers") or []),
                     aux_loss_coef=aux_loss_coef(hf, top_k), z_loss_coef=float(hf.get("router_z_loss_coef", 0.0)))


def qwen_moe_own_config(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    return dict(num_experts=moe.experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=cfg.expert_hidden,
                decoder_sparse_step=moe.every, mlp_only_layers=list(moe.dense_layers), norm_topk_prob=moe.renormalize,
                router_aux_loss_coef=moe.aux_loss_coef / moe.top_k, router_z_loss_coef=moe.z_loss_coef)


class Qwen2Moe(Qwen2):
    """Qwen2MoeForCausalLM: MoE blocks every decoder_sparse_step-th but mlp_only_layers, a sigmoid-gated shared expert
    (written empty, zero-size, when ours has none), q/k/v biases (qkv_bias)."""
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    name = "Qwen2-MoE"

    def refused(self, hf: dict) -> dict[str, tuple[object, bool]]:
        return {"use_sliding_window": (True, bool(hf.get("use_sliding_window")))}

    def fields(self, hf: dict, where: str) -> dict:
        return super().fields(hf, where) | {"qkv_bias": bool(hf.get("qkv_bias", True))}

    def own_hf_config(self, cfg: ModelConfig) -> dict:
        return qwen_moe_own_config(cfg) | dict(
            shared_expert_intermediate_size=cfg.moe.shared_experts * cfg.expert_hidden, qkv_bias=cfg.qkv_bias,
            use_sliding_window=False)

    def moe_config(self, hf: dict) -> MoEConfig:
        hidden, shared = hf["moe_intermediate_size"], hf.get("shared_expert_intermediate_size", 0)
        if shared % hidden:
            raise ValueError(f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size="
                             f"{hidden}, as our shared experts are")
        return qwen_moe_config(hf, shared // hidden)

    def extra_layer_state(self, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
        if cfg.moe.shared_experts:
            return {}
        empty = {}  # its shared expert, of size zero
        for name in ("gate_proj", "up_proj", "down_proj"):
            rows, cols = (cfg.dim, 0) if name == "down_proj" else (0, cfg.dim)
            empty[f"model.layers.{i}.mlp.shared_expert.{name}.weight"] = torch.zeros(rows, cols)
        empty[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
        return empty


class Qwen3Moe(Qwen3):
    """Qwen3MoeForCausalLM: Qwen3's attention, MoE blocks every decoder_sparse_step-th but mlp_only_layers, no
    shared expert, norm_topk_prob."""
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    name = "Qwen3-MoE"
    window_on_every_layer = True
    defaults = Qwen2.defaults  # its head_dim, when left out, is hidden / heads

    def sliding(self, hf: dict, where: str) -> tuple[int, list[int]]:
        return Llama.sliding(self, hf, where) if hf.get("use_sliding_window") else (0, [])

    def moe_config(self, hf: dict) -> MoEConfig:
        return qwen_moe_config(hf)

    def own_hf_config(self, cfg: ModelConfig) -> dict:
        window = window_of_every_layer(cfg)
        return qwen_moe_own_config(cfg) | dict(attention_bias=False, use_sliding_window=window is not None,
                                               sliding_window=window)


# in the order a model of ours (ModelConfig.family "") is matched to the first that holds it
FAMILIES = {family.model_type: family for family in (Llama(), Qwen2(), Qwen3(), Mistral(), Gemma3(), Mixtral(),
                                                      Qwen2Moe(), Qwen3Moe())}


def computed(cfg: ModelConfig) -> dict:
    """What of a config decides the function the model computes, as flat {key: value}: sizes as computed (0 means a
    default), settings that change nothing left out (the MoE's without experts, rope factors without scaling, a
    window without sliding layers), the family and the loss weights (a training matter) aside."""
    moe = cfg.moe
    out = dict(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
               kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, max_seq_len=cfg.max_seq_len, norm_eps=cfg.norm_eps,
               rope_theta=cfg.rope_theta, tie_embeddings=cfg.tie_embeddings, qkv_bias=cfg.qkv_bias,
               qk_norm=cfg.qk_norm, attention_scale=cfg.attention_scale if cfg.attention_scale != cfg.head_dim else 0.0,
               rope_scaling=cfg.rope_scaling, activation=cfg.activation, norm_plus_one=cfg.norm_plus_one,
               sandwich_norm=cfg.sandwich_norm, embed_scale=cfg.embed_scale)
    if any(not cfg.is_moe(i) for i in range(cfg.n_layers)):
        out["ffn_hidden"] = cfg.hidden
    if cfg.rope_scaling != "none":
        out["rope_factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        out |= dict(low=cfg.rope_low_freq_factor, high=cfg.rope_high_freq_factor, original=cfg.rope_original_context)
    if cfg.sliding_layers:
        out |= dict(sliding_window=cfg.sliding_window, sliding_layers=list(cfg.sliding_layers),
                    rope_local_theta=cfg.rope_local_theta)
    if moe.experts:
        out |= {f"moe.{k}": v for k, v in dict(experts=moe.experts, top_k=moe.top_k, shared=moe.shared_experts,
                                               hidden=cfg.expert_hidden, renormalize=moe.renormalize,
                                               moe_layers=[i for i in range(cfg.n_layers) if cfg.is_moe(i)]).items()}
    return out


def family_of(cfg: ModelConfig) -> Llama:
    """The transformers family our model exports as: the one it came from, or the first whose config expresses it."""
    if cfg.family:
        family = FAMILIES.get(cfg.family)
        if family is None or not family.holds(cfg):
            raise UserError(f"model.family={cfg.family!r}: the model's settings are not what that family computes")
        return family
    for family in FAMILIES.values():
        if family.holds(cfg):
            return family
    closest = FAMILIES["mixtral" if cfg.moe.experts else "llama"]
    back = closest.round_trip(cfg)
    ours = computed(cfg)
    differ = [k for k, v in ours.items() if back is None or computed(back).get(k) != v] or ["its settings"]
    raise UserError(f"no transformers model family computes this model: {closest.name} differs in {differ[0]} "
                    f"({ours.get(differ[0])!r}), and no other family computes that")


def integral(x: float) -> int | float:
    """A whole number as an int (transformers' configs check the types of their fields)."""
    return int(x) if float(x).is_integer() else x


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
        *others, last = [f.model_type for f in FAMILIES.values()]
        names = f"{', '.join(others)} and {last}"
        raise UserError(f"{os.path.join(path, CONFIG)}: model_type {hf.get('model_type')!r}: only {names} models can "
                        "be imported")
    return family, hf


def model_config(path: str) -> ModelConfig:
    """Our ModelConfig for a transformers directory."""
    family, hf = family_of_dir(path)
    return family.model_config(hf, os.path.join(path, CONFIG))


def weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = json.load(f)["weight_map"].values()
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{index}: unreadable ({e!r})") from None
        return [os.path.join(path, name) for name in sorted(set(names))]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise UserError(f"{path}: no model.safetensors (or {INDEX}); save the model with safetensors (transformers' "
                    "default)")


def placements(name: str, cfg: ModelConfig, ours_of: dict[str, tuple[str, int]]):
    """Where a stored tensor goes in our model: [(our tensor, expert index or None, its value from the stored
    one or None when it is copied as stored)]; [] for a tensor we do not keep; None for one we do not know."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    if name in ours_of:
        ours, heads = ours_of[name]
        return [(ours, None, (lambda t: rope_layout(t, heads, to_hf=False)) if heads else None)]
    if match := STORED_EXPERT.fullmatch(name):
        layer, expert, kind = match.groups()
        return [(f"layers.{layer}.feed_forward.{EXPERT_WEIGHT[kind]}", int(expert), None)]
    if match := STACKED_EXPERTS.fullmatch(name):
        ff = f"layers.{match.group(1)}.feed_forward"
        if match.group(2) == "down_proj":
            return [(f"{ff}.w2", None, None)]
        return [(f"{ff}.w1", None, lambda t: t.chunk(2, dim=1)[0]), (f"{ff}.w3", None, lambda t: t.chunk(2, dim=1)[1])]
    if name == "lm_head.weight" and cfg.tie_embeddings:  # tied: transformers ignores a stored head, and so do we
        return []
    if name.endswith("rotary_emb.inv_freq"):  # computed, not learned (older checkpoints kept it)
        return []
    if name.endswith("mlp.shared_expert_gate.weight") and not cfg.moe.shared_experts:  # gates an empty expert
        return []
    return None


@torch.no_grad()
def load_into(path: str, model: torch.nn.Module, storage=None, params: dict | None = None) -> None:
    """Fill `model` (built for this directory's config: on the meta device then given storage with to_empty, sharded
    by FSDP2, or partitioned by ZeRO-3 as it was built) from the directory's safetensors files, one tensor at a time and large
    ones in row blocks, each process reading only the rows it holds (the query/key projections, reordered, and
    stacked experts are read whole): no copy of the weights is held beside the model's own. storage(param): where
    a process holds a share of a parameter (a backend's, see models/storage.py); None, or a storage that answers None: all of
    it. Every element a process holds must be filled exactly once, and every stored tensor must have a place: a
    directory that does not fit is refused by the tensor's name. params: the parameters to fill by our name
    (default: the model's; a model with LoRA's adapters passes its base weights, checkpoint.weights.fill)."""
    cfg = model.cfg
    stores = {name: held(p, storage)  # a tied head is the embedding's
              for name, p in (params or dict(model.named_parameters())).items()}
    theirs_of = tensor_names(cfg)
    ours_of = {theirs: (ours, heads) for ours, (theirs, heads) in theirs_of.items()}
    filled = dict.fromkeys(stores, 0)
    for file in weight_files(path):
        try:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    places = placements(name, cfg, ours_of)
                    if places is None:
                        if f.get_slice(name).get_shape().count(0):  # Qwen2-MoE's empty shared expert
                            continue
                        raise UserError(f"{file}: tensor {name!r} has no place in our {cfg.family or 'model'} model "
                                        "(a setting of config.json it needs is not read)")
                    for ours, expert, value in places:
                        if ours not in stores:
                            raise UserError(f"{file}: tensor {name!r} has no place in our model")
                        filled[ours] += copy_tensor(f, name, stores[ours], expert, value, file)
        except (OSError, SafetensorError) as e:
            raise UserError(f"{file}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    for ours, count in filled.items():
        if count != stores[ours][0].numel():
            expected = theirs_of.get(ours, (f"the experts of {ours}",))[0]
            how = "stored more than once" if count > stores[ours][0].numel() else "missing"
            raise UserError(f"{path}: tensor {expected!r} is {how}")


def copy_tensor(f, name: str, store: tuple, expert: int | None, value, file: str) -> int:
    """The stored tensor `name` of an open safetensors file into its place (`store`, as storage.held gives it; `expert`:
    the tensor is that expert's part of a stacked parameter), cast to the parameter's dtype, through `value` when it
    is computed from the stored one, else straight from the file in row blocks — only the rows this process holds.
    Returns how many elements were written here."""
    flat, start, full_shape = store
    shape = full_shape if expert is None else full_shape[1:]
    offset = 0 if expert is None else expert * math.prod(shape)  # of this tensor in the parameter, flattened
    if value is not None:
        source = value(f.get_tensor(name))
        stored = tuple(source.shape)
    else:
        source = f.get_slice(name)
        stored = tuple(source.get_shape())
    if stored != tuple(shape):
        raise UserError(f"{file}: tensor {name!r} has shape {list(stored)}, our model's config asks for {list(shape)}")
    row, count = math.prod(shape[1:]), shape[0] if shape else 1  # a scalar is one row of one
    if not shape:
        source = (source if value is not None else f.get_tensor(name)).reshape(1)
    first = max(0, (start - offset) // row)  # the rows holding this process's elements
    end = min(count, -(-(start + flat.numel() - offset) // row))
    step = max(1, COPY_BYTES // max(1, row * flat.element_size()))
    written = 0
    for a in range(first, end, step):
        b = min(a + step, end)
        rows = source[a:b].reshape(-1)
        lo, hi = max(offset + a * row, start), min(offset + b * row, start + flat.numel())
        if lo < hi:
            flat[lo - start:hi - start].copy_(rows[lo - offset - a * row:hi - offset - a * row])
            written += hi - lo
    return written


def stored_dtypes(path: str) -> set[str]:
    """The dtypes a transformers directory stores its tensors in (safetensors' names: F32, BF16, …)."""
    dtypes = set()
    for file in weight_files(path):
        with safe_open(file, "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes
