"""GRPO: online reinforcement learning with rewards a program computes. Each step, every rank takes its share of
the global batch of prompts (the batch plan's, as any stage's examples), samples grpo.generations completions of
each with the live weights (the batched KV-cache sampler: no second engine, no weight sync), scores them with the
reward functions, turns the rewards into advantages (each reward minus its group's mean, scaled by the group's or
the global batch's std) and trains on the completions with PPO's clipped surrogate (grpo.loss weighs their tokens).

Completion k of the prompt at position p of the global order draws from a generator seeded by (seed, p, k): p
names the step and the prompt's place in it, so the samples, rewards, advantages and losses are the same on 1
process with accumulation and on N processes, and a resumed run samples what the uninterrupted one sampled. Every
statistic (advantage scale, reward means, the shares below) is over the whole global batch, never one rank's.

A group whose rewards are all equal (zero spread) has no advantage: it is counted and left out of the loss (TRL
keeps it, where it only dilutes the normaliser), as are completions no reward scored and, with
grpo.mask_truncated, completions cut off at grpo.max_new_tokens. A step left with nothing to learn from is
skipped and counted; grpo.max_empty_steps of them in a row stop the run.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import math
import sys
import time
import traceback
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.tokenizer import TextTokenizer, tokenizer_file

from ..data.batch import IGNORE, Batch, ExampleBatches
from ..data.order import BatchPlan
from ..data.packing import best_fit
from ..models import lora
from ..models.decoding import reply_end_ids, sample_batch, sample_seed, tokenizer_template
from ..parallel import env as D
from .losses import group_advantages, grpo_loss, grpo_units, sequence_tokens
from .reference import ReferenceStage, reference_model
from .rewards import load_reward, score

TABLE_PROMPTS = 4  # prompts of rank 0's validation share in the sample table of each evaluation


@dataclass
class Prompt:
    ids: list[int]               # what asks for a completion
    chat: bool                   # rendered with the chat template: a completion ends at its end of turn
    record: dict                 # the prompt as given and the record's other fields, for the rewards
    where: str                   # the input file and line it came from
    seed: tuple                  # what names its samples' generators, with the completion's number


@dataclass
class Prompts:
    """A micro-batch of prompts as read (before prepare samples their completions)."""
    prompts: list[Prompt]


class Sampled(NamedTuple):
    """The completions of a micro-batch of prompts: grpo.generations rows per prompt, in order."""
    ids: list[list[int]]                # each completion's ids, its stop id last when it stopped
    stopped: list[bool]                 # whether it ended by itself


@dataclass
class Completions(Batch):
    """The completions a micro-batch of prompts gave that the loss learns from, one per row after its prompt."""
    advantages: torch.Tensor | None = None   # one per completion: (rows,), or packed, (slots that segments name,)
    reference: torch.Tensor | None = None    # (rows, width) the reference's log-probs of the targets (β > 0)
    old: torch.Tensor | None = None          # (rows, width) the policy's log-probs before the cycle's first update
                                             # (grpo.iterations > 1)
    units: float = 0.0                       # what the loss divides by, summed over the rows (GRPO_LOSSES)
    stats: dict | None = None                # the first micro-batch's: the step's sampling statistics, as
                                             # (value, 1) pairs that the loop's global sums leave as they are


class PromptBatches(ExampleBatches):
    """Prompts of the global order, with the seeds of their completions: (seed, position) in training, (seed,
    "val", source, example) for the fixed validation subset (the same draws at every evaluation)."""

    def micro_batch(self, consumed: int, micro: int):
        positions = self.plan.micro_indices(consumed, micro)
        picks = self.picks(positions)
        return picks, self.collate([[p] for p in picks], positions=positions.tolist())

    def collate(self, rows, positions: list[int] | None = None) -> Prompts:
        picks = [p for row in rows for p in row]
        prompts = []
        for n, (s, j) in enumerate(picks):
            source = self.sources[s]
            tokens = source.example(j)[0][0][:-1]  # without the eos that ends every document
            self.check_vocab([tokens], [(s, j)])
            kept = source.record(j)
            seed = (self.seed, positions[n]) if positions is not None else (self.seed, "val", s, j)
            prompts.append(Prompt(tokens.tolist(), isinstance(kept["record"].get("prompt"), list), kept["record"],
                                  kept["where"], seed))
        return Prompts(prompts)


class Reward:
    """One reward function, called with the completion's text first, then by keyword with what its signature names
    (all of it with **kwargs) of: prompt (as the record gave it), completion_tokens, stopped (whether it ended by
    itself) and the record's other fields."""

    def __init__(self, spec: str, weight: float, name: str | None = None):
        self.spec, self.weight = spec, weight
        self.name = name or spec.rpartition(":")[2]
        self.fn = load_reward(spec)
        try:
            parameters = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):  # a builtin: the text alone
            parameters = []
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.text_name = positional[0].name if positional else None  # takes the text: never also a keyword
        self.takes_all = any(p.kind == p.VAR_KEYWORD for p in parameters)
        self.takes = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def __call__(self, text: str, keywords: dict, where: str) -> float | None:
        """The reward (None: the function gave none); a UserError naming the function, the prompt and what it
        did when it raised or gave something else than a finite number."""
        given = {k: v for k, v in keywords.items() if (self.takes_all or k in self.takes) and k != self.text_name}
        try:
            value = self.fn(text, **given)
        except Exception as e:  # the user's function: name it and the prompt, not our stack
            raise UserError(f"{where}: reward {self.spec} raised {type(e).__name__}: {e}") from None
        if value is None:
            return None
        return score(lambda _: value, text, f"{where}: reward {self.spec}")


class GRPO(ReferenceStage):
    name = "grpo"
    data_kind = "prompts"
    documents = 1
    unit = "prompts"
    chat = False
    packs, packs_examples = True, False  # data.packing packs the sampled completions into rows of data.seq_len
    loss_measures_fit = False  # a surrogate near 0 whatever the policy's quality: rewards say how it does
    own_sample = True  # evaluation shows a table of prompts with their best and worst completions
    batch_class = PromptBatches

    def __init__(self, cfg):
        super().__init__(cfg)
        grpo = cfg.grpo
        if grpo.max_new_tokens >= cfg.data.seq_len:
            raise UserError(f"grpo.max_new_tokens={grpo.max_new_tokens}: a row of data.seq_len={cfg.data.seq_len} "
                            "positions holds a prompt and its completion; raise data.seq_len or lower it")
        if grpo.prompts_per_step and cfg.train.grad_accum != 1:
            raise UserError("grpo.prompts_per_step and train.grad_accum: set one (the accumulation follows from the "
                            "prompts per step, the micro-batch and the processes)")
        if grpo.iterations > 1 and (cfg.train.ckpt_every % grpo.iterations or cfg.train.max_steps % grpo.iterations):
            raise UserError(f"grpo.iterations={grpo.iterations}: train.ckpt_every ({cfg.train.ckpt_every}) and "
                            f"train.max_steps ({cfg.train.max_steps}) must be multiples of it (a checkpoint falls "
                            "between the steps that share one step's samples)")
        if not grpo.rewards:
            raise UserError("grpo.rewards: no reward function; give one or more as [module:function, "
                            "path/to/file.py:function]")
        weights = grpo.reward_weights or [1.0] * len(grpo.rewards)
        names = [spec.rpartition(":")[2] for spec in grpo.rewards]
        self.rewards = [Reward(spec, w, name if names.count(name) == 1 else spec)  # metric names: unique
                        for spec, w, name in zip(grpo.rewards, weights, names, strict=True)]
        self.uses_reference = grpo.beta > 0
        self.stats: dict[str, float] = {}
        self.last = None  # rank 0: the last prepare's prompts, completions and rewards (the evaluation's table)
        self.tokenizer = None
        self.bad_rewards = 0  # grpo.skip_bad_rewards: rewards that raised or gave no number, in this step

    def batch_plan(self, world: int, rank: int = 0) -> BatchPlan:
        """With grpo.prompts_per_step, the accumulation that makes it the global batch on `world` processes: the
        same step on any number of them."""
        per, micro = self.cfg.grpo.prompts_per_step, self.cfg.train.micro_batch_size
        if not per:
            return super().batch_plan(world, rank)
        if per % (micro * world):
            raise UserError(f"grpo.prompts_per_step={per}: not a multiple of train.micro_batch_size x processes "
                            f"({micro} x {world})")
        return BatchPlan(micro, per // (micro * world), world, rank)

    @property
    def steps_per_batch(self) -> int:
        return self.cfg.grpo.iterations

    def identity(self) -> dict:
        g = self.cfg.grpo
        return {f"grpo.{k}": v for k, v in (
            ("loss", g.loss), ("generations", g.generations), ("iterations", g.iterations), ("max_new_tokens", g.max_new_tokens),
            ("temperature", g.temperature), ("top_p", g.top_p), ("top_k", g.top_k), ("beta", g.beta),
            ("epsilon", g.epsilon), ("epsilon_high", g.clip_high()), ("scale_rewards", g.scale_rewards),
            ("mask_truncated", g.mask_truncated),
            ("rewards", [[r.spec, r.weight] for r in self.rewards]))}  # pairs: a weight stays with its reward

    def room(self) -> tuple[int, str]:
        """Prompts that leave grpo.max_new_tokens positions in a row of data.seq_len fit; the rest are left out."""
        seq_len, new = self.cfg.data.seq_len, self.cfg.grpo.max_new_tokens
        return seq_len - new + 1, f"data.seq_len={seq_len} positions with grpo.max_new_tokens={new}"

    def describe_batch(self, plan) -> list[str]:
        g = self.cfg.grpo
        rows = plan.micro_batch * g.generations
        return [f"sampling: {plan.micro_batch} prompts x {g.generations} completions = {rows} rows decoded together "
                f"per micro-step; {plan.global_batch:,} prompts x {g.generations} = {plan.global_batch * g.generations:,} "
                f"completions of at most {g.max_new_tokens} tokens per step, over {plan.world} "
                f"process{'es' if plan.world != 1 else ''}" + (", and a reference's forward" if g.beta else "") +
                (f"; each step's samples trained on for {g.iterations} steps" if g.iterations > 1 else "") +
                (f"; packed into rows of {self.cfg.data.seq_len} positions" if self.cfg.data.packing else "")]

    def empty_reason(self, batches: list[Completions]) -> str:
        """From the step's own statistics (an evaluation since may have sampled others)."""
        s = {k: float(v[0]) for k, v in (batches[0].stats or {}).items()} if batches else {}
        parts = [f"{s.get('groups/zero_std', 0):.0f} of {s.get('groups', 0):.0f} groups had equal rewards"]
        if s.get("rewards/none"):
            parts.append(f"{s['rewards/none']:.0%} of the completions no reward scored")
        if self.cfg.grpo.mask_truncated and s.get("completions/truncated"):
            parts.append(f"{s['completions/truncated']:.0%} were cut off (grpo.mask_truncated)")
        return "no completion had an advantage: " + ", ".join(parts)

    def empty_limit(self) -> tuple[int, str]:
        return self.cfg.grpo.max_empty_steps, "grpo.max_empty_steps"

    def stop_ids(self, chat: bool) -> frozenset:
        """What ends a completion: eos, and after a chat prompt also the chat template's end of turn (found when
        first needed: plain prompts need no template)."""
        if chat not in self.stops:
            info = self.tokenizer.info
            self.stops[chat] = frozenset(reply_end_ids(info, tokenizer_template(info)))
        return self.stops[chat]

    def completion_text(self, ids: list[int], stopped: bool) -> str:
        return self.tokenizer.decode(ids[:-1] if stopped else ids)

    def make_data(self, run) -> PromptBatches:
        self.env, self.autocast = run.env, run.autocast
        self.tokenizer = TextTokenizer(tokenizer_file(run.cfg.out_dir))
        self.stops = {False: frozenset([self.tokenizer.eos_id])}
        if self.uses_reference:
            self.reference = reference_model(run, self.pinned) if self.pinned else None  # None: LoRA's adapters off
        return self.batches(run)

    # ------------------------------------------------------------------------------------------------ prepare
    def prepare(self, model, batches: list[Prompts], env, autocast) -> list[Completions]:
        """Sample, score, compute the advantages over the global batch, lay out the completions to learn from."""
        g = self.cfg.grpo
        if not batches:  # an evaluation without validation prompts (on every rank alike): nothing to report
            self.stats, self.last = {}, None
            return []
        started = time.perf_counter()
        sampled = [self.sample(model, b.prompts, env, autocast) for b in batches]
        sampling = time.perf_counter() - started
        started = time.perf_counter()
        problem, self.bad_rewards = None, 0
        try:
            rewards = [self.score(b.prompts, s.ids, s.stopped) for b, s in zip(batches, sampled, strict=True)]
        except Exception as e:  # every rank must hear of it before its next collective; a bug keeps its trace
            if not isinstance(e, UserError):
                traceback.print_exc()
            problem, rewards = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}", None
        if int(D.all_reduce_sum(env, torch.tensor(int(problem is not None), device=env.device))):
            raise UserError(problem or "a reward failed on another rank (its error is above)")
        scoring = time.perf_counter() - started

        total = torch.cat([(r * torch.tensor([w.weight for w in self.rewards], dtype=torch.float64)).nan_to_num()
                           .sum(dim=1).masked_fill(r.isnan().all(dim=1), math.nan) for r in rewards]) \
            if rewards else torch.zeros(0, dtype=torch.float64)
        lengths = torch.tensor([len(c) for s in sampled for c in s.ids], dtype=torch.float64)
        stopped = torch.tensor([x for s in sampled for x in s.stopped], dtype=torch.float64)
        scored = ~total.isnan()
        per_reward = torch.cat(rewards) if rewards else torch.zeros(0, len(self.rewards), dtype=torch.float64)
        _, zero = group_advantages(total, g.generations, "none")
        sums = torch.stack([
            scored.sum(), total[scored].sum(), (total[scored] ** 2).sum(),                      # the total reward
            *(x for f in range(len(self.rewards)) for x in (
                (~per_reward[:, f].isnan()).sum(), per_reward[:, f].nan_to_num().sum(),
                (per_reward[:, f].nan_to_num() ** 2).sum())),
            torch.tensor(float(len(zero))), zero.sum(), torch.tensor(float(len(total))), lengths.sum(),
            (1 - stopped).sum(), torch.tensor(float(self.bad_rewards)), torch.tensor(float(sampling)),
            torch.tensor(float(scoring)),
        ]).to(torch.float64)
        sums = D.all_reduce_sum(env, sums.to(env.device)).cpu()
        longest = -D.all_reduce_min(env, -int(lengths.max()) if len(lengths) else 0)
        # scale_rewards=batch: the std of the whole global batch's rewards (unbiased, as TRL's nanstd)
        advantages, _ = group_advantages(total, g.generations, g.scale_rewards, std_of(*sums[:3].tolist()))
        learn = scored & ~zero.repeat_interleave(g.generations)  # what has an advantage
        if g.mask_truncated:
            learn &= stopped.bool()
        self.stats = self.summary(sums, longest)
        self.last = (batches, sampled, total) if env.is_main else None

        out, at = [], 0
        for b, s in zip(batches, sampled, strict=True):
            rows = len(s.ids)
            out.append(self.lay_out(b.prompts, s, advantages[at:at + rows], learn[at:at + rows]))
            at += rows
        if self.uses_reference:  # the pinned weights, or with LoRA the policy with its adapters off
            reference = model if self.reference is None else self.reference
            off = lora.adapters_disabled(model) if self.reference is None else contextlib.nullcontext()
            with off:
                for batch, logps in zip(out, self.logps(reference, out, env, autocast), strict=True):
                    batch.reference = logps
        if g.iterations > 1:  # the later passes' ratios compare with the policy as it samples, computed as the
            # training forward computes (the sampler's KV-cache arithmetic rounds otherwise in bf16)
            for batch, logps in zip(out, self.logps(model, out, env, autocast), strict=True):
                batch.old = logps
        # every rank's (value, 1): the loop's global mean of such pairs is the value
        out[0].stats = {k: torch.tensor([v, 1.0]) for k, v in self.stats.items()}
        return out

    def sample(self, model, prompts: list[Prompt], env, autocast) -> Sampled:
        """grpo.generations completions of each prompt, decoded together, every rank as many forwards."""
        g = self.cfg.grpo
        rows = [(p, k) for p in prompts for k in range(g.generations)]
        lockstep = None
        if env.distributed:
            def lockstep(live: bool, failed: bool) -> tuple[bool, bool]:
                counts = D.all_reduce_sum(env, torch.tensor([int(live), int(failed)], device=env.device)).tolist()
                return counts[0] > 0, counts[1] > 0
        was_training = model.training
        model.eval()
        try:
            with autocast:
                ids, stopped = sample_batch(model, [p.ids for p, _ in rows], [self.stop_ids(p.chat) for p, _ in rows],
                                            [sample_seed(*p.seed, k) for p, k in rows], g.max_new_tokens,
                                            temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                            vocab_limit=self.tokenizer.vocab_size, with_stop=True, lockstep=lockstep)
        finally:
            model.train(was_training)
            with contextlib.suppress(AttributeError):
                model.forget_auxiliary()  # the routers' terms of the sampling forwards
        return Sampled(ids, stopped)

    def score(self, prompts: list[Prompt], ids: list[list[int]], stopped: list[bool]) -> torch.Tensor:
        """(completions, rewards): each reward of each completion; NaN where a reward gave none."""
        g = self.cfg.grpo
        values = torch.full((len(ids), len(self.rewards)), math.nan, dtype=torch.float64)
        for r, completion in enumerate(ids):
            prompt = prompts[r // g.generations]
            text = self.completion_text(completion, stopped[r])
            keywords = {**prompt.record, "completion_tokens": len(completion), "stopped": stopped[r]}
            for f, reward in enumerate(self.rewards):
                try:
                    value = reward(text, keywords, prompt.where)
                except UserError as e:
                    if not g.skip_bad_rewards:
                        raise
                    self.bad_rewards += 1
                    if self.bad_rewards == 1:
                        print(f"warning: {e} (grpo.skip_bad_rewards: counted as no reward, in rewards/bad)",
                              file=sys.stderr, flush=True)
                    continue
                if value is not None:
                    values[r, f] = value
        return values

    def lay_out(self, prompts: list[Prompt], sampled: Sampled, advantages: torch.Tensor,
                learn: torch.Tensor) -> Completions:
        g, ids = self.cfg.grpo, sampled.ids
        keep = [r for r in range(len(ids)) if learn[r]]
        seqs = []
        for r in keep:
            prompt = prompts[r // g.generations].ids
            tokens = np.array(prompt + ids[r], dtype=np.int64)
            seqs.append((tokens, np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(ids[r]), np.uint8)])))
        data = self.data
        if not seqs:  # nothing to learn from here: a filler row, as every rank runs as many forwards
            return data.lay_out([[(*data.filler(), 0)]], batch_type=Completions, advantages=torch.zeros(1), units=0.0)
        packed = self.cfg.data.packing  # rows of data.seq_len positions, each completion attending to itself
        rows = best_fit(np.array([len(t) - 1 for t, _ in seqs]), self.cfg.data.seq_len) if packed else \
            [[i] for i in range(len(seqs))]
        batch = data.lay_out([[(*seqs[i], i) for i in row] for row in rows], batch_type=Completions, packed=packed,
                             advantages=advantages[keep].float())
        tokens = sequence_tokens(batch.targets, batch.segments, len(seqs))
        batch.units = float(grpo_units(g.loss, tokens, g.max_new_tokens))
        return batch

    def batches(self, run, pack_window: int = 0) -> PromptBatches:
        self.data = super().batches(run, 0)
        return self.data

    @torch.no_grad()
    def logps(self, model, batches: list[Completions], env, autocast) -> list[torch.Tensor]:
        """Each batch's log-probs of its targets under `model`, at the sampling temperature (every rank as many
        forwards)."""
        out = []
        with autocast:
            for batch in batches:
                rows = batch.to(env.device)
                out.append(self.target_logps(model, rows).cpu())
        return out

    def target_logps(self, model, batch: Completions) -> torch.Tensor:
        """log p(target) at the sampling temperature at every position (0 where there is none), the output layer
        run at the targets alone: a prompt's and the padding's positions cost no logits."""
        targets = batch.targets != IGNORE
        picked = model(batch.inputs, segments=batch.segments, keep=targets, targets=batch.targets[targets],
                       temperature=self.cfg.grpo.temperature)
        return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(targets, picked)

    # ---------------------------------------------------------------------------------------------------- loss
    def units(self, batch: Completions) -> float:
        return batch.units

    def loss(self, model, batch: Completions):
        g = self.cfg.grpo
        logps = self.target_logps(model, batch)
        mask = batch.targets != IGNORE  # a filler row has no target
        reference = batch.reference.to(logps) if batch.reference is not None else None
        # one pass per sample: the sampling policy is the policy itself (ratio 1, its gradient the policy gradient);
        # several: the policy's before the cycle's first update
        old = batch.old.to(logps) if batch.old is not None else logps.detach()
        loss, metrics = grpo_loss(g.loss, logps, old, batch.advantages.to(logps), mask, segments=batch.segments,
                                  epsilon=g.epsilon, epsilon_high=g.clip_high(), beta=g.beta, ref_logps=reference)
        stats = {k: v.to(logps.device) for k, v in (batch.stats or {}).items()}
        return loss, {**metrics, **stats}

    # ------------------------------------------------------------------------------------------------- metrics
    def summary(self, sums: torch.Tensor, longest: int) -> dict[str, float]:
        g = self.cfg.grpo
        n, s1, s2 = sums[:3].tolist()
        out = {}
        if n:
            out["reward"], out["reward_std"] = s1 / n, std_of(n, s1, s2)
        for f, reward in enumerate(self.rewards):
            m, t1, t2 = sums[3 + 3 * f: 6 + 3 * f].tolist()
            if m:
                out[f"rewards/{reward.name}/mean"], out[f"rewards/{reward.name}/std"] = t1 / m, std_of(m, t1, t2)
        groups, zero, completions, length, truncated, bad, sampling, scoring = sums[3 + 3 * len(self.rewards):].tolist()
        world = self.env.world_size
        out.update({"groups": groups, "groups/zero_std": zero, "frac_reward_zero_std": zero / max(groups, 1),
                    "rewards/none": (completions - n) / max(completions, 1),
                    "completions/mean_length": length / max(completions, 1), "completions/max_length": float(longest),
                    "completions/truncated": truncated / max(completions, 1), "rewards/bad": bad,
                    # per step of the cycle that trains on these samples: the part of time/step they take
                    "time/sampling": sampling / world / g.iterations, "time/scoring": scoring / world / g.iterations,
                    "sampled_tokens_per_sec": length / max(sampling / world, 1e-9)})
        return out

    def evaluation_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.stats.items() if k.startswith(("reward", "completions/"))}

    def evaluation_sample(self) -> str | None:
        """A table of rank 0's first prompts of the last prepare (the evaluation's): the best and the worst
        completion of each, with their rewards."""
        if self.last is None:
            return None
        batches, sampled, total = self.last
        g = self.cfg.grpo
        lines, at = ["| prompt | best | reward | worst | reward |", "|---|---|---|---|---|"], 0
        for b, s in zip(batches, sampled, strict=True):
            ids, stopped = s.ids, s.stopped
            for i, prompt in enumerate(b.prompts):
                values = total[at + i * g.generations: at + (i + 1) * g.generations]
                # of the scored completions (any, when none was)
                best, worst = int(values.nan_to_num(-math.inf).argmax()), int(values.nan_to_num(math.inf).argmin())
                row = [self.tokenizer.decode(prompt.ids)]
                for k in (best, worst):
                    r = i * g.generations + k
                    row += [self.completion_text(ids[r], stopped[r]), f"{float(values[k]):.3g}"]
                lines.append("| " + " | ".join(cell(c) for c in row) + " |")
                if len(lines) - 2 >= TABLE_PROMPTS:
                    return "\n".join(lines)
            at += len(ids)
        return "\n".join(lines) if len(lines) > 2 else None


def cell(text: str) -> str:
    return html.escape(text.replace("\n", " ⏎ ").replace("|", "\\|"), quote=False)


def std_of(n: float, s1: float, s2: float) -> float:
    return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) if n > 1 else 0.0

