"""The output layer's log-probabilities of given targets, computed a chunk of rows at a time, so that the
(positions, vocabulary) logits of a micro-batch never exist whole: in fp32 they would be the largest tensors of a
step (16 x 2,048 positions x 32k vocabulary: 4 GiB, and the log-softmax's saved output as much again), larger
than a 1B model's weights.

    target_logps(x, weight, targets, temperature)  per row, log softmax(x W^T / temperature)[target]; each chunk's
                                                   logits are recomputed in the backward (DPO, KTO, GRPO: the
                                                   upstream gradient differs per row)
    target_logp_sum(x, weight, targets)            their sum (pretraining, SFT: every target weighs the same), its
                                                   gradient computed in the forward, chunk by chunk, while the logits
                                                   are at hand: no recomputation (as Liger-Kernel's fused linear
                                                   cross-entropy does)

A negative target (the data's IGNORE) has no log-prob: 0, and no gradient. The matmuls run in the autocast dtype when
autocast is on (as the plain output layer's would), the softmax in fp32.
"""

from __future__ import annotations

import torch

CHUNK_LOGIT_BYTES = 1 << 28  # fp32 logits of one chunk: 256 MiB (2,048 rows of a 32k vocabulary)


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on (bf16 training), else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def chunk_logits(x: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = (x @ weight.T).float()
    return logits / temperature if temperature != 1 else logits


def chunk_logit_grad(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """d(sum_r grad_r * logp_r[target_r]) / d(raw logits) of a chunk: grad_r * (onehot - softmax) / temperature."""
    out = (logits - lse.unsqueeze(1)).exp_().mul_(-grad.unsqueeze(1))
    out.scatter_add_(1, targets.clamp(min=0).unsqueeze(1), grad.unsqueeze(1))
    return out / temperature if temperature != 1 else out


def chunks(n: int, vocab: int):
    rows = chunk_rows(vocab)  # no rows (GRPO: no kept position): one empty chunk, whose results have their shapes
    return ((s, min(s + rows, n)) for s in range(0, max(n, 1), rows))


class ChunkGrads:
    """The gradients of x and of the weight, gathered chunk by chunk: x's rows in order, the weight's added up in
    fp32. Built from each chunk's result rather than written into buffers made beforehand: torch 2.11's compiled
    autograd.Function loses writes into a tensor that it then saves (every gradient came out 0)."""

    def __init__(self, needs: tuple[bool, bool]):
        self.needs, self.rows, self.weight = needs, [], None

    def add(self, g: torch.Tensor, xc: torch.Tensor, wc: torch.Tensor, s: int, e: int) -> None:
        """A chunk's logit gradient (rows s:e) through x W^T."""
        if self.needs[0]:
            self.rows.append(g @ wc)
        if self.needs[1]:
            part = (g.T @ xc[s:e]).float()
            self.weight = part if self.weight is None else self.weight + part

    def of_x(self, x: torch.Tensor) -> torch.Tensor | None:
        return torch.cat(self.rows).to(x.dtype) if self.needs[0] else None


class TargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, temperature, dtype):
        xc, wc = x.to(dtype), weight.to(dtype)
        picked, lses = [], []
        for s, e in chunks(x.shape[0], weight.shape[0]):
            logits = chunk_logits(xc[s:e], wc, temperature)
            lses.append(logits.logsumexp(dim=-1))
            picked.append(logits.gather(1, targets[s:e].clamp(min=0).unsqueeze(1)).squeeze(1) - lses[-1])
        lse = torch.cat(lses)
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.temperature, ctx.dtype = temperature, dtype
        return torch.cat(picked) * (targets >= 0)

    @staticmethod
    def backward(ctx, grad):
        x, weight, targets, lse = ctx.saved_tensors
        xc, wc = x.to(ctx.dtype), weight.to(ctx.dtype)
        grad = grad.float() * (targets >= 0)
        grads = ChunkGrads(ctx.needs_input_grad[:2])
        for s, e in chunks(x.shape[0], weight.shape[0]):
            logits = chunk_logits(xc[s:e], wc, ctx.temperature)
            grads.add(chunk_logit_grad(logits, lse[s:e], targets[s:e], grad[s:e], ctx.temperature).to(ctx.dtype),
                      xc, wc, s, e)
        return grads.of_x(x), None if grads.weight is None else grads.weight.to(weight.dtype), None, None, None


class TargetLogpSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, dtype, needs: tuple[bool, bool]):
        xc, wc = x.to(dtype), weight.to(dtype)
        grads = ChunkGrads(needs)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s, e in chunks(x.shape[0], weight.shape[0]):
            logits = chunk_logits(xc[s:e], wc, 1.0)
            lse = logits.logsumexp(dim=-1)
            t = targets[s:e]
            real = (t >= 0).float()
            total = total + ((logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1) - lse) * real).sum()
            if any(needs):
                grads.add(chunk_logit_grad(logits, lse, t, real, 1.0).to(dtype), xc, wc, s, e)
        gx, gw = grads.of_x(x), grads.weight
        ctx.save_for_backward(*(g for g in (gx, gw) if g is not None))
        ctx.needs, ctx.weight_dtype = needs, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        gx = next(saved) if ctx.needs[0] else None
        gw = next(saved) if ctx.needs[1] else None
        return (None if gx is None else gx * grad.to(gx.dtype), None if gw is None else (gw * grad).to(ctx.weight_dtype),
                None, None, None)


def target_logps(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """x (..., dim), targets (...) → log p(target) (...), fp32, 0 where the target is negative."""
    shape = targets.shape
    out = TargetLogps.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), temperature, compute_dtype(x))
    return out.view(shape)


def target_logp_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of log p(target) over the targets that are not negative: a 0-dim fp32 tensor."""
    needs = (torch.is_grad_enabled() and x.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    return TargetLogpSum.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), compute_dtype(x), needs)
