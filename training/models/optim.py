"""The optimizer — AdamW with decoupled weight decay on matrices only, or Muon on the blocks' matrices with AdamW for
the rest — and the learning-rate schedule as a pure function of the step (nothing to save or restore)."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = muon_params(named, cfg)
    adamw = adamw_for([p for _, p in named if not any(p is q for q in muon)], cfg, device)
    if not muon:
        return adamw
    return CombinedOptimizer(Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum), adamw)


def muon_params(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """What train.optimizer=muon trains with Muon: the blocks' matrices (and stacked experts) of the trained ones."""
    return [p for n, p in named if cfg.optimizer == "muon" and n.startswith("layers.") and p.dim() >= 2]


def optimizer_state_bytes(model: torch.nn.Module, cfg: TrainConfig) -> int:
    """The optimizer state of a model's trained parameters, in bytes: AdamW's two fp32 moments, Muon's one
    momentum."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = sum(p.numel() for p in muon_params(named, cfg))
    return 4 * muon + 8 * (sum(p.numel() for _, p in named) - muon)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan's; torch.optim.Muon's algorithm and state): Nesterov momentum, orthogonalised by a
    quintic Newton-Schulz iteration, the step scaled to the RMS an AdamW step has (0.2 * sqrt(max(rows, cols)),
    Moonlight's "match_rms_adamw", so one train.lr and schedule serve both optimizers), decoupled weight decay.

    Two differences from torch.optim.Muon, which is otherwise the same update (tests/test_training.py compares):
    the iteration runs in bf16 on GPUs but in fp32 on CPUs, where bf16 matmuls are far slower (a one-off timing: ~45x at 192 x 192);
    and a 3-D parameter (an MoE block's stacked experts) is orthogonalised per matrix of its first dimension."""

    COEFFICIENTS = (3.4445, -4.7750, 2.0315)

    def __init__(self, params, lr: float, weight_decay: float = 0.1, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype | None = None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @staticmethod
    def orthogonalise(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
        a, b, c = Muon.COEFFICIENTS
        x = g.to(dtype)
        tall = x.size(-2) > x.size(-1)
        if tall:
            x = x.mT
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral norm at most 1
        fused = torch.addmm if x.dim() == 2 else torch.baddbmm  # a*x + (b*G + c*G@G) @ x, as torch rounds it
        for _ in range(steps):
            gram = x @ x.mT
            x = fused(x, fused(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.mT if tall else x

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov
                dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
                update = like(p, self.orthogonalise(whole(update), group["ns_steps"], dtype))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape[-2:])))


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's tensor (a DTensor: dist.backend=fsdp2) gathered whole on every rank; others as they
    are. Newton-Schulz orthogonalises whole matrices: each rank then computes the same update, DDP's."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A whole tensor sharded as parameter p is, each rank keeping its own shard of it (no communication)."""
    if not hasattr(p, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor  # only where one is: start-up (docs/architecture.md)

    return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)


def whole_dim(p: torch.Tensor) -> int:
    """The dimensions of the whole parameter: a ZeRO-3 partition made inside deepspeed.zero.Init is a flat tensor,
    its shape kept in ds_shape (a DTensor answers for the whole already)."""
    return len(getattr(p, "ds_shape", p.shape))


def adamw_for(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in params if whole_dim(p) >= 2]        # matmuls and embeddings
    no_decay = [p for p in params if whole_dim(p) < 2]      # norm gains
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused_adamw(device))


def fused_adamw(device: torch.device) -> bool:
    """One kernel for the whole update on GPU, which also skips a non-finite one without the host looking
    (parallel/ddp.py); the default foreach path on CPU."""
    return device.type == "cuda"


class CombinedOptimizer:
    """Several optimizers over disjoint parameters, seen by the loop and the checkpoints as one: their param groups
    in order, one step, one state dict."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {type(o).__name__: o.state_dict() for o in self.optimizers}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {type(o).__name__ for o in self.optimizers}:
            raise ValueError(f"the saved optimizer state holds {sorted(state)}, this run has "
                             f"{sorted(type(o).__name__ for o in self.optimizers)}")
        for o in self.optimizers:
            o.load_state_dict(state[type(o).__name__])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, constant or WSD; or the
    learning-rate range test's sweep (range_test: exponentially from lr * min_lr_ratio at the first step to lr at the last)."""
    if cfg.schedule == "range_test":
        return cfg.lr * cfg.min_lr_ratio ** (1 - step / max(1, cfg.max_steps - 1))
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":  # warmup, stable, then linear decay over the last decay_fraction of the steps
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (low - cfg.lr) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - low)
