"""A Llama-style decoder: RMSNorm, rotary position embeddings, SwiGLU, grouped-query attention through
F.scaled_dot_product_attention, optional tied embeddings. Plain PyTorch: nothing distributed in here.

Packed rows: `segments` (batch, seq) names the sequence each position belongs to (any ids, equal within a
sequence, each sequence contiguous). A position then attends only to earlier positions of its own sequence and
its rotary position restarts at 0 where the sequence starts: a sequence computes as it would alone in its row."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 64 * math.ceil(8 * self.dim / 3 / 64)

    def validate(self) -> list[str]:
        """Problems as 'model.key: message' strings (empty when the shape is consistent)."""
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"model.dim: {self.dim} is not divisible by model.n_heads={self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"model.dim: head size {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            problems.append(f"model.n_kv_heads: {self.kv_heads} does not divide model.n_heads={self.n_heads}")
        for key in ("dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                problems.append(f"model.{key}: must be positive")
        return problems


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freqs)
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
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.kv_heads != self.n_heads
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            out = flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
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
        if mask is not None and gqa:  # on CUDA only the flash and math kernels group heads, and flash takes no mask:
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)  # shared heads copied, the memory-
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)  # efficient kernel then takes the mask
            gqa = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Per position, its distance from the start of its sequence (rotary positions restart per sequence)."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def document_mask(segments: torch.Tensor, impl: str = "sdpa"):
    """Causal attention within each sequence of a row: a boolean (batch, 1, seq, seq) mask for SDPA, or a
    FlexAttention BlockMask (whose kernels skip the blocks that are all masked)."""
    if impl == "flex":
        def same_sequence_causal(b, h, q, k):
            return (segments[b, q] == segments[b, k]) & (k <= q)

        b, t = segments.shape
        return flex_block_mask()(same_sequence_causal, b, None, t, t, device=segments.device)
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool, device=segments.device).tril()
    return ((segments.unsqueeze(2) == segments.unsqueeze(1)) & causal).unsqueeze(1)


@functools.cache
def flex_block_mask():
    """create_block_mask compiled once: uncompiled it materialises the whole (batch, seq, seq) mask on the way."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


@functools.cache
def flex_attention():
    """FlexAttention compiled once: uncompiled it computes the whole score matrix (its reference path)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, mask)
        return x + self.feed_forward(self.ffn_norm(x))


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
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):  # residual outputs: GPT-2's depth scaling
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)
        cos, sin = rope_tables(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                segments: torch.Tensor | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (batch, seq) → logits (batch, seq, vocab); segments: see the module's docstring. pad (batch,):
        left padding of each row (batched decoding), whose positions no token attends to and which rotary
        positions skip, so that each row computes as its sequence alone."""
        start = cache.length if cache is not None else 0
        end = start + tokens.shape[1]
        # left-padded rows: the shortest must fit; longer rows that reach the context stop there (caller's rule)
        if end - (int(pad.max()) if pad is not None else 0) > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin, mask = self.rope_cos[start:end], self.rope_sin[start:end], None
        if segments is not None:
            if cache is not None:
                raise ValueError("packed rows (segments) are a training layout: decoding with a cache takes one sequence per row")
            positions = segment_positions(segments)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            mask = document_mask(segments, self.attention_impl)
        elif pad is not None:
            queries = torch.arange(start, end, device=tokens.device)
            positions = (queries.unsqueeze(0) - pad.unsqueeze(1)).clamp(0, self.cfg.max_seq_len - 1)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            keys = torch.arange(end, device=tokens.device)
            mask = (keys >= pad.view(-1, 1, 1)) & (keys <= queries.view(1, -1, 1))
            mask = (mask | (keys == queries.view(1, -1, 1))).unsqueeze(1)  # a padding query sees itself: no empty row
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.length = end
        return self.output(self.norm(x))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token as PaLM and nanoGPT count them for MFU: 6 per matmul weight (forward and
        backward) plus 12 * layers * dim * seq_len for attention scores and mixing (causality not discounted)."""
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * self.cfg.n_layers * self.cfg.dim * seq_len
