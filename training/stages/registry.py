"""Every stage, by name: the one list of them. Adding a stage is its module in this room, a line here, its config
section and, when its data is new, a preprocess kind."""

from __future__ import annotations

from preprocess.errors import UserError

from .base import Stage
from .dpo import DPO
from .grpo import GRPO
from .kto import KTO
from .pretrain import Pretrain
from .sft import SFT

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (Pretrain, SFT, DPO, KTO, GRPO)}


def stage_for_kind(kind: str, where: str = "") -> type[Stage]:
    """The stage that trains on shards of this kind (training.lr_find and describe, from a config's data.path)."""
    for stage in STAGES.values():
        if stage.data_kind == kind:
            return stage
    raise UserError(f"{where or 'data.path'}: holds {kind} shards, which no training stage reads")
