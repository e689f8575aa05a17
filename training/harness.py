"""Our model inside EleutherAI's lm-evaluation-harness: an `lm_eval` model class over a loaded Transformer and its
tokenizer, and running tasks with it.

The harness's own TemplateLM does what transformers' models do before the model is called — the context and
continuation split at the same tokens, an empty context conditioned on the tokenizer's bos (else eos), rolling
windows for perplexities cut by its own helpers — so a task scores our checkpoint as `lm_eval --model hf` scores
its export. What is ours: the forwards (the output layer run only at the positions scored), batches of
requests of similar length, greedy or sampled generation with our KV cache, and several processes, each
scoring its share of the requests (the harness splits them and gathers the metrics through this class).
"""

from __future__ import annotations

import os

import lm_eval
import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from preprocess.errors import UserError

from .models.decoding import sample_batch, sample_seed


class ShardlmLM(TemplateLM):
    """lm_eval's model interface on a Transformer (eval mode, its weights whole on this process) and its
    TextTokenizer. rank/world: this process's share of the requests (the harness pads the shares to one count)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, rank: int = 0, world: int = 1, seed: int = 0):
        super().__init__()
        self.model, self.tok, self.batch_size, self.seed = model, tokenizer, batch_size, seed
        self._rank, self._world_size = rank, world
        self._device = next(model.parameters()).device
        special = tokenizer.info.special_ids
        self._prefix = special.get("bos", special["eos"])

    @property
    def device(self) -> torch.device:
        return self._device

    # ---------------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context, and a rolling window's start, is conditioned on: bos, else eos (as transformers'
        models in the harness)."""
        return self._prefix

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # ---------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding gives it) of each (key, context ids, continuation
        ids), the context cut from the left to the model's context; requests of similar length batched, rows
        padded after their tokens (causal: nothing real attends to the padding)."""
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], len(continuation), continuation))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for at in range(0, len(order), self.batch_size):
            batch = [rows[i] for i in order[at:at + self.batch_size]]
            width = max(len(inputs) for inputs, _, _ in batch)
            tokens = torch.full((len(batch), width), self.tok.eos_id, dtype=torch.long)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, (inputs, n, _) in enumerate(batch):
                tokens[r, :len(inputs)] = torch.tensor(inputs)
                keep[r, len(inputs) - n:len(inputs)] = True
            logits = self.model(tokens.to(self.device), keep=keep.to(self.device)).float()
            logps = torch.log_softmax(logits, dim=-1)
            start = 0
            for r, (_, n, continuation) in enumerate(batch):
                piece, target = logps[start:start + n], torch.tensor(continuation, device=self.device)
                start += n
                results[order[at + r]] = (float(piece.gather(1, target[:, None]).sum()),
                                          bool((piece.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, in windows of the model's context, each predicting tokens that
        no window before it did (the harness's own windows)."""
        windows, counts = [], []
        for (string,) in (req.args for req in requests):
            mine = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            windows += [(None, context, continuation) for context, continuation in mine]
            counts.append(len(mine))
        scores, out, at = self._loglikelihood_tokens(windows), [], 0
        for n in counts:
            out.append(sum(score for score, _ in scores[at:at + n]))
            at += n
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued (greedy, or sampled when do_sample) until eos or max_gen_toks, then cut at the
        first of its `until` strings, as the harness's transformers models cut; batched, left-padded."""
        out = []
        for at in range(0, len(requests), self.batch_size):
            batch = requests[at:at + self.batch_size]
            prompts, stops, seeds, limits, untils, greedy, temperature = [], [], [], [], [], True, 1.0
            for i, req in enumerate(batch):
                context, kwargs = req.args
                kwargs = dict(kwargs)
                until = kwargs.pop("until", None) or []
                untils.append([until] if isinstance(until, str) else list(until))
                limit = int(kwargs.pop("max_gen_toks", 256))
                limits.append(limit)
                prompts.append(self.tok_encode(context)[-(self.max_length - limit):] if limit < self.max_length
                               else self.tok_encode(context)[-1:])
                greedy = greedy and not kwargs.get("do_sample", False) and not kwargs.get("temperature", 0.0)
                temperature = float(kwargs.get("temperature", 1.0) or 1.0)
                stops.append(self.tok.eos_id)
                seeds.append(sample_seed(self.seed, at + i, self.rank))
            ids, _ = sample_batch(self.model, prompts, stops, seeds, max(limits), greedy=greedy,
                                  temperature=temperature, vocab_limit=self.tok.vocab_size)
            for new, limit, until in zip(ids, limits, untils, strict=True):
                text = self.tok_decode(new[:limit])
                for stop in until:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out.append(text)
        return out

    # ---------------------------------------------------------------------------------------- processes
    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        parts = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def run_tasks(lm: ShardlmLM, tasks: list[str], include: list[str], limit: float | None, num_fewshot: int | None,
              seed: int = 0) -> dict | None:
    """lm_eval.simple_evaluate on `lm`: the results on rank 0 (per-example samples too), None on the others.
    Unknown tasks are one line naming them."""
    # the harness's own thousands of tasks are indexed (seconds) only when a task is not among the included ones
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (looked in {', '.join(include)} and lm-eval's own tasks)" if include else " (lm-eval's own tasks)"
        raise UserError(f"--tasks: {unknown[0]} is not a task{where}")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                   log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, bootstrap_iters=0)


def task_paths(paths: list[str]) -> list[str]:
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"--include {path}: not found")
    return paths
