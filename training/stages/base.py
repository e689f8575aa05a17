"""The Stage interface: what one stage adds to the one loop — the shards it reads, how it lays them out in batches,
its pure loss, and what its loss needs from the whole global batch. The loop calls only these; a stage never
names a backend, and the loop never names a stage.

    stage = STAGES[name](cfg)              # checks the stage's own options
    pinned = stage.pin(start, env)         # before the model is built: weights kept for the whole run (a reference)
    data = stage.make_data(run)            # the run's batches (and anything the stage prepares with: a reference)
    batches = stage.prepare(model, batches, env, autocast)   # every rank, the same number of batches
    loss_sum, metric_sums = stage.loss(model, batch)         # sums over the batch's units
    means = stage.summarise(means)
"""

from __future__ import annotations

import torch

from preprocess.errors import UserError

from ..config import Config
from ..data.batch import IGNORE, Batch, GlobalBatches
from ..data.order import BatchPlan


class Stage:
    name: str                        # the command (python -m training.<name>) and the run identity's "stage"
    data_kind: str                   # the `kind` its shard directories must have (python -m preprocess shards --kind)
    documents: int = 0               # documents per example (1: a conversation, 2: a pair); 0: samples of the stream
    unit: str = "samples"            # what the batch plan counts, as `describe` says it
    chat: bool = False               # samples are generated as assistant replies
    token_loss: bool = False         # the loss is nats per target token (val_bpb is meaningful)
    packs: bool = False              # data.packing packs its examples into rows
    packs_examples: bool = True      # ... the examples as read, which the batch plan then counts as rows (GRPO
                                     # packs the completions it samples instead)
    masks_documents: bool = False    # data.document_mask restricts attention to each document of a sample
    own_sample: bool = False         # evaluation shows evaluation_sample(), not a continuation of train.sample_prompt
    loss_measures_fit: bool = True   # a lower loss means a better model (training.lr_find compares rates by it)
    steps_per_batch: int = 1         # optimizer steps on each prepared global batch (GRPO's iterations): the data
                                     # advances, and checkpoints and stops happen, only between such cycles

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def check(self) -> None:
        """The data options that mean something for this stage (before any process group or out_dir exists)."""
        cfg = self.cfg
        if cfg.data.packing and not self.packs:
            raise UserError(f"data.packing: {self.name} examples are padded, one per row (packing is for sft and dpo)")
        if cfg.data.document_mask and not self.masks_documents:
            raise UserError(f"data.document_mask is for pretraining; {self.name} examples attend only to themselves "
                            f"already{' (data.packing=true packs them)' if self.packs else ''}")

    def identity(self) -> dict:
        """The stage's settings a resume must share (its loss and options), as flat {key: value}."""
        return {}

    def pin(self, start, env) -> str | None:
        """Before the model is built (start: run.build.StartingPoint): a copy of the starting weights that the
        stage keeps for the whole run, out of reach of any later change of their run; a fresh run's policy then
        starts from the same copy. None: nothing pinned."""
        return None

    @property
    def prepares(self) -> bool:
        """Whether prepare() does anything: evaluation then prepares its whole validation subset at once (one
        batch at a time otherwise)."""
        return type(self).prepare is not Stage.prepare

    def make_data(self, run) -> GlobalBatches:
        """The run's batches; `run` (training.run.build.Run) holds the sources, plan, model, backend and state."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, batches: list, env, autocast) -> list:
        """Before the losses of one optimizer step (or of one evaluation), with the batches of every micro-step:
        what their losses need that collation cannot give (a reference model's forward, a statistic of the whole
        global batch). Every rank calls it at the same point, with the same number of batches."""
        return batches

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss summed over the batch's units, and metric sums (a (sum, count) pair for a mean over a subset)."""
        raise NotImplementedError

    def units(self, batch: Batch) -> int:
        """Loss units in a batch: target tokens, by default."""
        return int((batch.targets != IGNORE).sum())

    def summarise(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the means over the global batch (and from what prepare() found over it)."""
        return means

    def batch_plan(self, world: int, rank: int = 0) -> BatchPlan:
        """How a step's global batch is split: the config's micro-batch x accumulation x processes."""
        return BatchPlan.of(self.cfg.train, world, rank)

    def room(self) -> tuple[int, str]:
        """(positions an example may take, how to say so): examples that need more are left out and counted."""
        return self.cfg.data.seq_len, f"data.seq_len={self.cfg.data.seq_len} positions"

    def describe_batch(self, plan) -> list[str]:
        """Lines `describe` adds about the batch (what a step does with it beyond the forward and backward)."""
        return []

    def evaluation_metrics(self) -> dict[str, float]:
        """What an evaluation reports besides val_loss (as val_<key>), from the last prepare() (of the validation
        batches)."""
        return {}

    def evaluation_sample(self) -> str | None:
        """With own_sample: what an evaluation shows (on rank 0; None elsewhere, or for nothing to show)."""
        return None

    def empty_reason(self, batches: list) -> str:
        """Why a step's global batch (this rank's `batches` of it) held no unit: the loop skips it and counts it."""
        return "no unit to learn from in the global batch"

    def empty_limit(self) -> tuple[int, str]:
        """(how many such steps in a row stop the run, the key that says so)."""
        return self.cfg.train.max_nonfinite_steps, "train.max_nonfinite_steps"
