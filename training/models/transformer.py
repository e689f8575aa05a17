"""A Llama-style decoder: RMSNorm, rotary position embeddings, SwiGLU, grouped-query attention through
F.scaled_dot_product_attention, optional tied embeddings. Plain PyTorch: nothing distributed in here.

A few switches cover the open model families (training/models/hf.py maps each family's config onto them): biases
on the query/key/value projections, RMSNorm of each head's queries and keys, a head size of its own, rotary
frequencies stretched for long context (linear or Llama 3's bands), sliding-window layers with their own rotary
base, GeGLU, norms of the form x̂·(1 + w), norms after attention and the feed-forward as well as before, embeddings
scaled by √dim, and a score scale of its own. Their defaults are the plain model.

Packed rows: `segments` (batch, seq) names the sequence each position belongs to (any ids, equal within a
sequence, each sequence contiguous). A position then attends only to earlier positions of its own sequence and
its rotary position restarts at 0 where the sequence starts: a sequence computes as it would alone in its row.

Mixture of experts (model.moe): the feed-forward of every n-th block becomes a router and a set of experts; each
token goes through its top-k experts (dropless: no capacity, no token dropped), computed as grouped matmuls."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as flex
from torch.utils.checkpoint import checkpoint

from .output import target_logp_sum, target_logps


@dataclass
class MoEConfig:
    experts: int = 0              # 0: every feed-forward is dense
    top_k: int = 2                # experts per token, weighted by their router probabilities renormalised to sum 1
    shared_experts: int = 0       # expert-sized feed-forwards every token goes through: one fused SwiGLU of
                                  # shared_experts x expert_hidden, scaled per token by a learned sigmoid gate
    every: int = 1                # block i is MoE when (i + 1) % every == 0; the others keep the dense feed-forward
    expert_hidden: int = 0        # 0: the dense feed-forward's hidden size
    aux_loss_coef: float = 0.01   # load balancing (Switch): E * sum_i f_i P_i per row, weighted by its tokens
    z_loss_coef: float = 0.0      # router z-loss (ST-MoE): logsumexp(router logits)^2 per token
    renormalize: bool = True      # the k routing weights rescaled to sum 1 (false: the softmax's own, as Qwen1.5-MoE)
    dense_layers: list[int] = field(default_factory=list)  # blocks that keep the dense feed-forward whatever `every`

    def validate(self) -> list[str]:
        if self.experts == 0:
            return []
        problems = []
        if self.experts < 1:
            problems.append("model.moe.experts: must be 0 (dense) or positive")
        elif not 1 <= self.top_k <= self.experts:
            problems.append(f"model.moe.top_k: {self.top_k} must be between 1 and model.moe.experts={self.experts}")
        for key in ("shared_experts", "expert_hidden"):
            if getattr(self, key) < 0:
                problems.append(f"model.moe.{key}: must not be negative")
        if self.every < 1:
            problems.append("model.moe.every: must be at least 1")
        if any(i < 0 for i in self.dense_layers):
            problems.append("model.moe.dense_layers: block numbers start at 0")
        for key in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                problems.append(f"model.moe.{key}: must not be negative")
        return problems


@dataclass
class ModelConfig:
    vocab_size: int = 0           # 0: the tokenizer's vocabulary, rounded up to vocab_multiple
    vocab_multiple: int = 64      # a round vocabulary keeps the output matmul fast; extra ids are never targets
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0           # 0: same as n_heads (no grouping)
    ffn_hidden: int = 0           # 0: 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    head_size: int = 0            # of each attention head; 0: dim / n_heads
    qkv_bias: bool = False        # biases on the query, key and value projections (Qwen2)
    qk_norm: bool = False         # RMSNorm over each head's queries and keys before the rotary embedding (Qwen3, Gemma 3)
    attention_scale: float = 0.0  # scores scaled by attention_scale ** -0.5 (Gemma's query_pre_attn_scalar); 0: head size
    sliding_window: int = 0       # the blocks in sliding_layers attend to their last sliding_window positions only
    sliding_layers: list[int] = field(default_factory=list)
    rope_scaling: str = "none"    # none | linear (frequencies / rope_factor) | llama3 (Llama 3.1's bands)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0    # llama3: wavelengths past original_context / this are stretched fully
    rope_high_freq_factor: float = 4.0   # llama3: wavelengths below original_context / this are kept
    rope_original_context: int = 8192    # llama3: the context the frequencies were trained at
    rope_local_theta: float = 0.0  # the sliding layers' own rotary base, never scaled (Gemma 3); 0: as the others
    activation: str = "silu"      # of the gated feed-forward: silu (SwiGLU) | gelu_tanh (GeGLU)
    norm_plus_one: bool = False   # RMSNorm scales by 1 + weight, the weight starting at 0 (Gemma)
    sandwich_norm: bool = False   # also a norm on the attention's and the feed-forward's outputs (Gemma 3)
    embed_scale: bool = False     # embeddings multiplied by sqrt(dim) (Gemma)
    family: str = ""              # the transformers model_type the weights came from and export as; "": by shape

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 64 * math.ceil(8 * self.dim / 3 / 64)

    @property
    def expert_hidden(self) -> int:
        return self.moe.expert_hidden or self.hidden

    def is_moe(self, layer: int) -> bool:
        return self.moe.experts > 0 and (layer + 1) % self.moe.every == 0 and layer not in self.moe.dense_layers

    def window(self, layer: int) -> int:
        """How many of its last positions block `layer` attends to; 0: all."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def validate(self) -> list[str]:
        """Problems as 'model.key: message' strings (empty when the shape is consistent)."""
        problems = []
        if self.head_size < 0:
            problems.append("model.head_size: must not be negative")
        elif not self.head_size and self.dim % self.n_heads:
            problems.append(f"model.dim: {self.dim} is not divisible by model.n_heads={self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"model.dim: head size {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            problems.append(f"model.n_kv_heads: {self.kv_heads} does not divide model.n_heads={self.n_heads}")
        for key in ("dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                problems.append(f"model.{key}: must be positive")
        if self.rope_scaling not in ROPE_SCALINGS:
            problems.append(f"model.rope_scaling: {self.rope_scaling!r} is not one of {', '.join(ROPE_SCALINGS)}")
        elif self.rope_scaling != "none" and self.rope_factor <= 0:
            problems.append("model.rope_factor: must be positive")
        elif self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            problems.append("model.rope_low_freq_factor: must be positive and below model.rope_high_freq_factor")
        if self.activation not in ACTIVATIONS:
            problems.append(f"model.activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.sliding_window < 0 or (self.sliding_layers and self.sliding_window < 1):
            problems.append("model.sliding_window: must be positive for model.sliding_layers")
        if any(not 0 <= i < self.n_layers for i in self.sliding_layers):
            problems.append(f"model.sliding_layers: block numbers are 0 to {self.n_layers - 1}")
        return problems + self.moe.validate()


ROPE_SCALINGS = ("none", "linear", "llama3")
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:  # scaled in fp32, then rounded (as Gemma's reference does)
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return normed.type_as(x) * self.weight


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """The rotation frequency of each pair of a head's dimensions; `local`: of the sliding layers, when they have
    a base of their own (never scaled)."""
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    freqs = 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    if local or cfg.rope_scaling == "none":
        return freqs
    if cfg.rope_scaling == "linear":
        return freqs / cfg.rope_factor
    # llama3: long wavelengths slowed by rope_factor, short ones kept, the band between interpolated smoothly
    wavelength = 2 * math.pi / freqs
    longest, shortest = (cfg.rope_original_context / cfg.rope_low_freq_factor,
                         cfg.rope_original_context / cfg.rope_high_freq_factor)
    stretched = torch.where(wavelength > longest, freqs / cfg.rope_factor, freqs)
    smooth = (cfg.rope_original_context / wavelength - cfg.rope_low_freq_factor) / \
        (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    between = (1 - smooth) * stretched / cfg.rope_factor + smooth * stretched
    return torch.where((wavelength >= shortest) & (wavelength <= longest), between, stretched)


def rope_tables(cfg: ModelConfig, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), rope_frequencies(cfg, local))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotates interleaved pairs (x0, x1), (x2, x3), ... by cos/sin of shape
    (seq, head_dim / 2) or, per row, (batch, 1, seq, head_dim / 2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale ** -0.5 if cfg.attention_scale else None  # None: SDPA's 1 / sqrt(head size)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        gqa = self.kv_heads != self.n_heads
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            out = flex_attention()(q, k, v, block_mask=mask, scale=self.scale, enable_gqa=gqa)
            return self.wo(out.transpose(1, 2).reshape(b, t, -1))
        causal = mask is None
        if cache is not None:  # new tokens see every cached position, and each other causally
            k, v = cache.update(layer, k, v)
            past = k.shape[2] - t
            if mask is not None:  # left-padded rows: the mask covers every cached position already
                pass
            elif t == 1:
                causal = False
            elif past > 0:
                mask, causal = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past), False
        if mask is not None and gqa and x.device.type != "cpu":  # off the CPU (on CUDA only the flash and math
            # kernels group heads, and flash takes no mask): shared heads copied, the memory-efficient kernel then
            # takes the mask (the CPU's kernels group heads under a mask, faster than the copies: bench/grpo.py)
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            gqa = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Per position, its distance from the start of its sequence (rotary positions restart per sequence)."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def document_mask(segments: torch.Tensor, impl: str = "sdpa", window: int = 0):
    """Causal attention within each sequence of a row (within its last `window` positions, if given): a boolean
    (batch, 1, seq, seq) mask for SDPA, or a FlexAttention BlockMask (whose kernels skip the blocks that are all
    masked)."""
    if impl == "flex":
        def same_sequence_causal(b, h, q, k):
            near = (q - k < window) if window else True
            return (segments[b, q] == segments[b, k]) & (k <= q) & near

        b, t = segments.shape
        return flex_block_mask()(same_sequence_causal, b, None, t, t, device=segments.device)
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    if window:
        causal = causal.triu(diagonal=1 - window)
    return ((segments.unsqueeze(2) == segments.unsqueeze(1)) & causal).unsqueeze(1)


@functools.cache
def flex_block_mask():
    """create_block_mask compiled once: uncompiled it materialises the whole (batch, seq, seq) mask on the way."""
    return torch.compile(create_block_mask)


@functools.cache
def flex_attention():
    """FlexAttention compiled once: uncompiled it computes the whole score matrix (its reference path)."""
    return torch.compile(flex)


class OutputLayer(nn.Linear):
    """The vocabulary projection: logits, or given targets the log-probabilities of those alone (models/output.py:
    computed a chunk of rows at a time, no (positions, vocabulary) tensor kept). A module of its own, so that a
    backend that gathers a module's weights around its forward (ZeRO-3) gathers them for the log-probs too."""

    @classmethod
    def tied_to(cls, embedding: nn.Embedding) -> OutputLayer:
        """The projection whose weight is the embedding's, made without a weight of its own first."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = embedding.embedding_dim, embedding.num_embeddings
        layer.weight = embedding.weight
        layer.register_parameter("bias", None)
        return layer

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, temperature: float = 1.0,
                summed: bool = False) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        if summed:
            if temperature != 1:
                raise ValueError("summed log-probs are the training loss's: temperature 1")
            return target_logp_sum(x, self.weight, targets)
        return target_logps(x, self.weight, targets, temperature)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int = 0):
        super().__init__()
        hidden = hidden or cfg.hidden
        self.activation = ACTIVATIONS[cfg.activation]
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
    """Rows of x sorted by expert (counts[e] rows for expert e) times each expert's w[e].T: (rows, out). grouped:
    whether torch's grouped matmul serves this device and dtype (None: find out, which compiled code cannot)."""
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover grouped_mm: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if grouped if grouped is not None else grouped_mm_works(x.device.type, x.dtype):
        return F.grouped_mm(x, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([rows @ w[e].T for e, rows in enumerate(x.split(counts.tolist()))])  # a loop over experts


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype, compiled: bool = False) -> bool:
    """Whether this torch has a grouped matmul for the device and dtype (CUDA's needs bf16 and a recent GPU). A
    forward alone, without autocast or gradients: the same answer inside evaluation, a checkpointed block's
    recomputation or a reference model's no_grad forward as outside. compiled: also under torch.compile, which
    traces it through its meta kernel — stricter than CPU's eager one (bf16 only, torch 2.13)."""
    try:
        for device in (device_type, "meta") if compiled else (device_type,):
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                x = torch.ones(4, 16, device=device, dtype=dtype)
                w = torch.ones(2, 16, 16, device=device, dtype=dtype)
                F.grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([1, 4], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@dataclass
class Routing:
    """What one MoE layer's router did in a training forward, for the balance losses and the load metrics."""
    logits: torch.Tensor   # (batch, seq, experts), fp32
    chosen: torch.Tensor   # (batch, seq, top_k) expert ids


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (plus an optional gated shared expert), dropless. Each token's output depends
    on that token alone, whatever else is in the batch. Expert weights are stacked (experts, out, in)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe, hidden = cfg.moe, cfg.expert_hidden
        self.experts, self.top_k, self.renormalize = moe.experts, moe.top_k, moe.renormalize
        self.activation = ACTIVATIONS[cfg.activation]
        self.router = nn.Linear(cfg.dim, moe.experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(moe.experts, hidden, cfg.dim))
        self.w3 = nn.Parameter(torch.empty(moe.experts, hidden, cfg.dim))
        self.w2 = nn.Parameter(torch.empty(moe.experts, cfg.dim, hidden))
        self.shared = self.shared_gate = None
        if moe.shared_experts:
            self.shared = FeedForward(cfg, hidden=moe.shared_experts * hidden)
            self.shared_gate = nn.Linear(cfg.dim, 1, bias=False)
        self.grouped: bool | None = None  # whether grouped_mm serves the run's device and dtype (choose_expert_matmul)
        self.routing: Routing | None = None  # set by a forward with gradients, taken by auxiliary_losses(); a
                                             # block's recomputation in the backward sets it again (forget_auxiliary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.router(flat).float()
        weights, chosen = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.training and torch.is_grad_enabled():
            self.routing = Routing(logits.view(b, t, -1), chosen.view(b, t, -1))
        # every (token, choice) slot, sorted by expert: each expert's rows are contiguous
        order = chosen.flatten().argsort(stable=True)
        counts = torch.zeros(self.experts, dtype=torch.long, device=x.device).index_add_(  # no data-dependent size
            0, chosen.flatten(), torch.ones_like(chosen.flatten()))
        rows = flat[order // self.top_k]
        hidden = self.activation(grouped_matmul(rows, self.w1, counts, self.grouped)) * \
            grouped_matmul(rows, self.w3, counts, self.grouped)
        out = grouped_matmul(hidden, self.w2, counts, self.grouped)
        # back to (token, choice) order and weighted; the k outputs of a token summed in a fixed order
        unsorted = torch.empty_like(out).index_copy_(0, order, out).view(-1, self.top_k, d)
        out = (unsorted * weights.unsqueeze(-1).to(unsorted.dtype)).sum(dim=1)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(flat)) * self.shared(flat)
        return out.view(b, t, d).to(x.dtype)


class AuxiliaryLosses(NamedTuple):
    """What a training forward adds to the stage's loss: the MoE routers' losses."""
    loss: torch.Tensor                      # a sum over the forward's positions (the loop divides by the global batch's)
    metrics: dict[str, torch.Tensor]        # moe_aux, moe_z: sums over the same positions
    loads: dict[int, torch.Tensor]          # tokens per expert of each MoE layer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)
        self.feed_forward = MoE(cfg) if cfg.is_moe(layer) else FeedForward(cfg)
        self.attention_out_norm = self.ffn_out_norm = None
        if cfg.sandwich_norm:
            self.attention_out_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)
            self.ffn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)
        self.checkpointed = False  # activations recomputed in the backward instead of kept (checkpoint_activations)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        if cache is not None:  # decoding: never compiled (each token's position would be a new graph)
            return self.compute(x, cos, sin, cache, layer, mask)
        return self.whole_sequence(x, cos, sin, layer, mask)

    def whole_sequence(self, x, cos, sin, layer, mask):
        """A forward over whole rows (training, evaluation): what Transformer.compile_blocks compiles."""
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self.compute, x, cos, sin, None, layer, mask, use_reentrant=False)
        return self.compute(x, cos, sin, None, layer, mask)

    def compute(self, x, cos, sin, cache, layer, mask):
        h = self.attention(self.attention_norm(x), cos, sin, cache, layer, mask)
        x = x + (self.attention_out_norm(h) if self.attention_out_norm is not None else h)
        h = self.feed_forward(self.ffn_norm(x))
        return x + (self.ffn_out_norm(h) if self.ffn_out_norm is not None else h)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to max_len positions."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled, advanced by Transformer.forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if problems := cfg.validate():
            raise ValueError("; ".join(problems))
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (0 is resolved from the tokenizer before building)")
        self.cfg = cfg
        self.attention_impl = "sdpa"  # how packed rows are masked: sdpa (a boolean mask) | flex (FlexAttention)
        # the layers' own initialisations are drawn and forgotten: reset_parameters draws from where the caller's
        # generator stood, as a model built on the meta device draws when it is filled (checkpoint.weights.fill)
        with torch.random.fork_rng(devices=[]):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)
            # tied: no weight of its own is ever made (under ZeRO-3's zero.Init it would be, whole, then partitioned)
            self.output = OutputLayer.tied_to(self.tok_embeddings) if cfg.tie_embeddings else \
                OutputLayer(cfg.dim, cfg.vocab_size, bias=False)
        for name in self.rope_names():
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.reset_parameters()

    def rope_names(self) -> list[str]:
        """The rotary tables' buffers: cos and sin, and the sliding layers' own when they have a base of their own."""
        return ["rope_cos", "rope_sin"] + (["rope_local_cos", "rope_local_sin"] if self.local_rope() else [])

    def local_rope(self) -> bool:
        return bool(self.cfg.rope_local_theta and self.cfg.sliding_layers)

    def reset_buffers(self) -> None:
        """The rotary tables, computed (also after the model was built on the meta device and moved with to_empty)."""
        device = self.tok_embeddings.weight.device
        tables = rope_tables(self.cfg) + (rope_tables(self.cfg, local=True) if self.local_rope() else ())
        for name, table in zip(self.rope_names(), tables, strict=True):
            setattr(self, name, table.to(device))

    def materialize(self, device, dtype: torch.dtype | None = None) -> Transformer:
        """A model built on the meta device given storage on `device` (its parameters in `dtype`, default as built),
        uninitialised (its weights are loaded next): the tied head tied again (to_empty gives each parameter its
        own) and the rotary tables computed (in fp32 whatever the parameters' dtype)."""
        if dtype is not None:
            for p in self.parameters():
                p.data = p.data.to(dtype)
        self.to_empty(device=device)
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_buffers()
        return self

    def reset_parameters(self) -> None:
        """The random initialisation: each parameter in turn, drawn from torch's global generator in the order of
        named_parameters (a sharded model replays the same draws a parameter at a time: checkpoint.weights.fill)."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p)
        self.reset_buffers()

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        """The initial values of the parameter `name` (as named_parameters names it), written into `p`."""
        std = self.cfg.init_std
        if name.endswith("norm.weight"):
            nn.init.zeros_(p) if self.cfg.norm_plus_one else nn.init.ones_(p)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        elif name.endswith(("wo.weight", "w2.weight", "feed_forward.w2")):  # residual outputs: GPT-2's depth scaling
            nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
        else:
            nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                segments: torch.Tensor | None = None, pad: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, targets: torch.Tensor | None = None, temperature: float = 1.0,
                summed: bool = False) -> torch.Tensor:
        """tokens: (batch, seq) → logits (batch, seq, vocab); segments: see the module's docstring. pad (batch,):
        left padding of each row (batched decoding), whose positions no token attends to and which rotary
        positions skip, so that each row computes as its sequence alone. keep: a bool (batch, seq) mask of the
        positions whose logits are wanted → (kept, vocab), the output layer run at those alone.

        targets (batch, seq), or (kept,) with keep: instead of logits, log p(target) at each position in fp32 (0
        where the target is negative: IGNORE), of the logits divided by `temperature`, without the whole logits
        tensor ever existing; summed=True: their sum (the negative of the summed cross-entropy)."""
        if keep is not None and keep.dtype != torch.bool:
            raise TypeError(f"keep: a bool mask of positions, not {keep.dtype}")
        start = cache.length if cache is not None else 0
        end = start + tokens.shape[1]
        # left-padded rows: the shortest must fit; longer rows that reach the context stop there (caller's rule)
        if end - (int(pad.max()) if pad is not None else 0) > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        positions, mask = None, None  # rotary positions per row (None: start..end), the mask (None: causal)
        if segments is not None:
            if cache is not None:
                raise ValueError("packed rows (segments) are a training layout: decoding with a cache takes one sequence per row")
            positions = segment_positions(segments)
            mask = document_mask(segments, self.attention_impl)
        elif pad is not None:
            queries = torch.arange(start, end, device=tokens.device)
            positions = (queries.unsqueeze(0) - pad.unsqueeze(1)).clamp(0, self.cfg.max_seq_len - 1)
            keys = torch.arange(end, device=tokens.device)
            mask = (keys >= pad.view(-1, 1, 1)) & (keys <= queries.view(1, -1, 1))
            mask = (mask | (keys == queries.view(1, -1, 1))).unsqueeze(1)  # a padding query sees itself: no empty row
        tables, masks = {}, {0: mask}
        x = self.tok_embeddings(tokens)
        if self.cfg.embed_scale:  # the scale rounded to the weights' dtype first, as Gemma's reference does
            x = x * torch.tensor(self.cfg.dim ** 0.5, dtype=x.dtype, device=x.device)
        for i, layer in enumerate(self.layers):
            window = self.cfg.window(i) if self.cfg.window(i) < end else 0  # a window past every key changes nothing
            local = self.cfg.window(i) > 0 and self.local_rope()
            if local not in tables:
                cos, sin = (self.rope_local_cos, self.rope_local_sin) if local else (self.rope_cos, self.rope_sin)
                tables[local] = (cos[start:end], sin[start:end]) if positions is None else \
                    (cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
            if window not in masks:
                masks[window] = self.window_mask(window, mask, segments, start, end, tokens.device)
            x = layer(x, *tables[local], cache, i, masks[window])
        if cache is not None:
            cache.length = end
        x = self.norm(x)
        x = x if keep is None else x[keep]
        return self.output(x) if targets is None else self.output(x, targets, temperature, summed)

    def window_mask(self, window: int, mask, segments, start: int, end: int, device):
        """The mask of a sliding layer: the full layers' (None: causal) limited to each query's last `window` keys."""
        if segments is not None:
            return document_mask(segments, self.attention_impl, window)
        queries, keys = torch.arange(start, end, device=device).view(-1, 1), torch.arange(end, device=device)
        near = (keys <= queries) & (queries - keys < window)  # (queries, keys): every cached key counted
        return near if mask is None else mask & near

    def checkpoint_activations(self, mode: str, every: int = 2) -> None:
        """The blocks whose activations the backward recomputes (torch.utils.checkpoint, non-reentrant): none,
        every one (full) or every `every`-th (every_n, from the first)."""
        step = {"none": 0, "full": 1, "every_n": every}[mode]
        for i, block in enumerate(self.layers):
            block.checkpointed = bool(step) and i % step == 0

    def compile_blocks(self, **options) -> None:
        """train.compile per block: each block's forward over whole rows, in place (torch.compile's options: tests
        count the compiled calls). Decoding with the KV cache stays eager: its growing positions would recompile
        the one code object all blocks share up to dynamo's recompile limit, after which whatever was not compiled
        yet runs eager (training's forward, in a run that samples at step 0). FSDP2's gathers, hooked around each
        block, stay outside the graph."""
        for block in self.layers:
            block.whole_sequence = torch.compile(block.whole_sequence, **options)

    def choose_expert_matmul(self, device_type: str, dtype: torch.dtype, compiled: bool) -> None:
        """Whether MoE blocks use torch's grouped matmul or one matmul per expert: decided once, outside any compiled
        code (finding out runs a small matmul)."""
        works = grouped_mm_works(device_type, dtype, compiled)
        for m in self.modules():
            if isinstance(m, MoE):
                m.grouped = works

    def auxiliary_losses(self, positions: torch.Tensor | None = None) -> AuxiliaryLosses | None:
        """The routers' losses of the last training forward, taken (a later forward starts afresh); None when no MoE
        layer ran one. `positions` (batch, seq) marks those holding a token (None: all).

        Load balancing, per row r (f: the share of its routed slots each expert got, P: its mean router
        probability): E * sum_i f_ri P_ri, which is 1 when balanced; summed over rows weighted by their tokens. Per
        row rather than per batch, so that the loss is the same however rows are split over micro-batches and
        processes. The z-loss (ST-MoE): logsumexp(router logits)^2 per token. Both are averaged over the MoE layers
        (a coefficient means the same at any depth) and weighed by model.moe's coefficients."""
        layers = {i: block.feed_forward for i, block in enumerate(self.layers)
                  if isinstance(block.feed_forward, MoE) and block.feed_forward.routing is not None}
        if not layers:
            return None
        aux = z = 0.0
        loads = {}
        for i, layer in layers.items():
            routing, layer.routing = layer.routing, None
            mask = (torch.ones(routing.chosen.shape[:2], device=routing.chosen.device) if positions is None
                    else positions.to(routing.chosen.device).float())
            slots = torch.zeros(*routing.chosen.shape[:2], layer.experts, device=mask.device).scatter_add_(
                2, routing.chosen, torch.ones_like(routing.chosen, dtype=torch.float)) * mask.unsqueeze(-1)  # (b, t, E)
            probs = routing.logits.softmax(dim=-1) * mask.unsqueeze(-1)
            tokens = mask.sum(dim=1, keepdim=True).clamp(min=1)                                    # (b, 1)
            share = slots.sum(dim=1) / (layer.top_k * tokens)                                     # f, (b, E)
            aux = aux + layer.experts * (share * probs.sum(dim=1)).sum()                          # sum_r T_r E f.P
            z = z + (torch.logsumexp(routing.logits, dim=-1).square() * mask).sum()
            loads[i] = slots.sum(dim=(0, 1)).detach()
        aux, z = aux / len(layers), z / len(layers)
        loss = self.cfg.moe.aux_loss_coef * aux + self.cfg.moe.z_loss_coef * z
        if not any(layer.router.weight.requires_grad for layer in layers.values()):
            loss = loss.detach()  # frozen routers (LoRA): the losses would only push the adapters below them around
        return AuxiliaryLosses(loss, {"moe_aux": aux.detach(), "moe_z": z.detach()}, loads)

    def forget_auxiliary(self) -> None:
        """Drop what the backward's recomputation (activation checkpointing) recorded: it would hold its graph."""
        for m in self.modules():
            if isinstance(m, MoE):
                m.routing = None

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token as PaLM and nanoGPT count them for MFU: 6 per matmul weight a token passes (forward
        and backward; of an MoE block its router, top-k experts and shared expert) plus 12 * layers * heads * head size * seq_len
        for attention scores and mixing (causality and windows not discounted). From the shape, so also under ZeRO-3."""
        cfg, moe = self.cfg, self.cfg.moe
        attention = 2 * cfg.dim * cfg.head_dim * (cfg.n_heads + cfg.kv_heads)
        weights = cfg.vocab_size * cfg.dim
        for i in range(cfg.n_layers):
            weights += attention
            if cfg.is_moe(i):
                weights += cfg.dim * moe.experts + 3 * cfg.dim * cfg.expert_hidden * (moe.top_k + moe.shared_experts)
                weights += cfg.dim if moe.shared_experts else 0
            else:
                weights += 3 * cfg.dim * cfg.hidden
        return 6 * weights + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
