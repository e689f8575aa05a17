"""Our model inside EleutherAI's lm-evaluation-harness: an `lm_eval` model class over a Transformer and its
tokenizer, and running tasks with it — for training.evaluate, and inside a run (eval.tasks).

The harness's own TemplateLM does what transformers' models do before the model is called — the context and
continuation split at the same tokens, an empty context conditioned on the tokenizer's bos (else eos), rolling
windows for perplexities cut by its own helpers — so a task scores our checkpoint as `lm_eval --model hf` scores
its export. What is ours: the forwards (the output layer run only at the positions scored), batches of
requests of similar length, greedy or sampled generation with our KV cache, and several processes: each is given
every request, scores every world-th one and gathers the others' scores, so the harness runs alike everywhere.
Every process runs as many forwards as the others (filler batches where it has fewer, generation until every
process is done): a sharded model (ZeRO-3, FSDP2) gathers its weights in each forward.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re

import datasets
import lm_eval
import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager, get_task_dict
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table

from preprocess.chat_template import ModelTemplate
from preprocess.errors import UserError
from preprocess.fileio import atomic_write
from preprocess.formats import Bad, messages_to_turns

from ..models.decoding import reply_end_ids, sample_batch, sample_seed, tokenizer_template


class ChatText:
    """The model's chat template as the harness uses it: messages rendered to text (apply_chat_template), and that
    text, with whatever follows it, encoded with the template's control tokens as tokens — the ids the chat
    prompts of training.generate and GRPO are. A tokenizer.json's model's template, or shardlm's own."""

    def __init__(self, tok):
        self.tok, self.template = tok, tokenizer_template(tok.info)
        if not isinstance(self.template, ModelTemplate):  # ours: its role symbols and end of turn, spelled out
            self.symbols = {role: tok.piece(i) for role, i in self.template.role_ids.items()}
            self.end = tok.piece(self.template.end_id)
            spelled = {tok.piece(i): i for i in [*self.template.role_ids.values(), self.template.end_id]}
            self.split = re.compile("(" + "|".join(map(re.escape, spelled)) + ")")
            self.ids = spelled

    def render(self, messages: list[dict]) -> str:
        turns = messages_to_turns(messages, "chat_history")
        if isinstance(turns, Bad):
            raise UserError(f"a task's chat history cannot be rendered ({turns.detail or turns.reason})")
        if isinstance(self.template, ModelTemplate):
            try:
                return self.template.render(self.template.messages(turns), True)
            except Exception as e:  # the template refuses these turns (its raise_exception)
                raise UserError(f"{self.template.where}: the chat template refused a task's chat history "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return "".join(f"{self.symbols[t.role]}{t.text}{self.end}" for t in turns) + self.symbols["assistant"]

    def encode(self, text: str) -> list[int]:
        if isinstance(self.template, ModelTemplate):
            return self.template.encode(text)
        ids = []
        for i, piece in enumerate(self.split.split(text)):
            ids += [self.ids[piece]] if i % 2 else self.tok.encode(piece) if piece else []
        return ids


class ShardlmLM(TemplateLM):
    """lm_eval's model interface on a Transformer (eval mode, its weights whole on this process) and its
    TextTokenizer. rank/world: this process's share of the requests, scored by it alone."""

    def __init__(self, model, tokenizer, batch_size: int = 8, rank: int = 0, world: int = 1, seed: int = 0,
                 chat: bool = False):
        super().__init__()
        self.model, self.tok, self.batch_size, self.seed = model, tokenizer, batch_size, seed
        self.chat = ChatText(tokenizer) if chat else None
        # every process is given every request and scores its share (shard::shards), then the shares are gathered:
        # the harness sees one process (rank 0 of 1), so every process runs its methods alike, with the same
        # collectives, whatever share of a task's examples it would otherwise have had (none, for some)
        self.shard, self.shards = rank, world
        self._device = next(model.parameters()).device
        special = tokenizer.info.special_ids
        self._prefix = special.get("bos", special["eos"])
        # a reply ends at any end the model has (its template's end of turn too); plain text at eos
        self.stops = reply_end_ids(tokenizer.info, self.chat.template) if chat else [tokenizer.eos_id]

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
        return self.chat.encode(string) if self.chat is not None else self.tok.encode(string)

    # ---------------------------------------------------------------------------------------- chat
    @property
    def tokenizer_name(self) -> str:
        return self.tok.info.sha256[:16]

    def chat_template(self, chat_template: bool | str = False) -> str:
        """What the harness records of the template: its identity (a model's sha256, or shardlm's own)."""
        return json.dumps(self.chat.template.identity()) if self.chat is not None else ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat history as the template renders it, asking for the assistant's reply (a task's gen_prefix,
        which continues a started reply, is refused)."""
        if self.chat is None:
            raise UserError("the harness asked for a chat template: give --apply-chat-template (eval.chat)")
        if not add_generation_prompt:
            raise UserError("a task continues a started assistant reply (gen_prefix), which is not supported")
        return self.chat.render(chat_history)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or QUIET[0])

    # ---------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding gives it) of each (key, context ids, continuation
        ids), the context cut from the left to the model's context: this process's share (every world-th request),
        requests of similar length batched, rows padded after their tokens (causal: nothing real attends to the
        padding); every process's results, gathered."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation):,} tokens is longer than the model's context "
                                f"({self.max_length:,})")
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], len(continuation), continuation))
        mine = sorted(range(self.shard, len(rows), self.shards), key=lambda i: -len(rows[i][0]))
        results: dict[int, tuple[float, bool]] = {}
        for at in range(0, self.most(len(mine)), self.batch_size):
            batch = [rows[i] for i in mine[at:at + self.batch_size]] or [([self.tok.eos_id], 1, [self.tok.eos_id])]
            width = max(len(inputs) for inputs, _, _ in batch)
            tokens = torch.full((len(batch), width), self.tok.eos_id, dtype=torch.long)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, (inputs, n, _) in enumerate(batch):
                tokens[r, :len(inputs)] = torch.tensor(inputs)
                keep[r, len(inputs) - n:len(inputs)] = True
            logps = torch.log_softmax(self.model(tokens.to(self.device), keep=keep.to(self.device)).float(), dim=-1)
            start = 0
            for i, (_, n, continuation) in zip(mine[at:at + self.batch_size], batch, strict=False):  # a filler: none
                piece, target = logps[start:start + n], torch.tensor(continuation, device=self.device)
                start += n
                results[i] = (float(piece.gather(1, target[:, None]).sum()), bool((piece.argmax(-1) == target).all()))
        return self.gathered(results, len(rows))

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

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued until one of the model's ends or the request's max_gen_toks, greedy or sampled
        as its settings say (the harness's own reading of them), then cut at its `until` strings; requests of the
        same settings batched, left-padded, the context cut to leave room for max_gen_toks. A sampled request's
        randomness comes from (seed, its index) alone: the same text on any number of processes."""
        settings = [normalize_gen_kwargs(req.args[1], 256) for req in requests]
        groups: dict[str, list[int]] = {}
        for i, kwargs in enumerate(settings):
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
        texts: dict[int, str] = {}
        for members in groups.values():  # the same groups, in the same order, on every process
            kwargs = dict(settings[members[0]])
            until, limit = kwargs.pop("until"), kwargs.pop("max_gen_toks")
            if limit >= self.max_length:
                raise UserError(f"a task asks for {limit:,} new tokens (max_gen_toks), as many as the model's context "
                                f"({self.max_length:,}) or more")
            temperature = float(kwargs.get("temperature") or 0.0)
            sampled = bool(kwargs.get("do_sample")) and temperature > 0  # temperature 0: greedy
            mine = members[self.shard::self.shards]
            for at in range(0, self.most(len(mine)), self.batch_size):
                batch = mine[at:at + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - limit):] or [self.prefix_token_id]
                           for i in batch]  # an empty context: conditioned on bos (else eos), as log-likelihoods are
                ids, _ = sample_batch(self.model, prompts, [self.stops] * len(batch),
                                      [sample_seed(self.seed, i) for i in batch], limit, greedy=not sampled,
                                      temperature=temperature or 1.0, top_k=int(kwargs.get("top_k") or 0),
                                      top_p=float(kwargs.get("top_p") or 1.0), vocab_limit=self.tok.vocab_size,
                                      lockstep=self.lockstep if self.shards > 1 else None)
                for i, new in zip(batch, ids, strict=True):
                    texts[i] = postprocess_generated_text(self.tok_decode(new), until, None)
        return self.gathered(texts, len(requests))

    # ---------------------------------------------------------------------------------------- processes
    def most(self, count: int) -> int:
        """The largest `count` of any process: how many batches each one runs (a sharded model's forwards gather
        its weights from every process)."""
        if self.shards == 1:
            return count
        t = torch.tensor([count], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def lockstep(self, live: bool, failed: bool) -> tuple[bool, bool]:
        """Whether any process still generates, or failed to draw: all decode until every one is done."""
        t = torch.tensor([int(live), int(failed)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0]), bool(t[1])

    def gathered(self, mine: dict[int, object], count: int) -> list:
        """Every process's results, by request index, on every process."""
        if self.shards > 1:
            parts: list = [None] * self.shards
            dist.all_gather_object(parts, mine)
            mine = {i: value for part in parts for i, value in part.items()}
        return [mine[i] for i in range(count)]


QUIET = [False]  # set by quiet(): our model class's progress bars off too


def quiet() -> None:
    """The harness's info lines and progress bars, and the datasets library's, off (inside a run, in its log)."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    QUIET[0] = True


class Tasks:
    """Tasks by name — the harness's, or YAML files under the `include` directories — found once (a run evaluates
    them again and again). `keys` names the options in errors: ("--tasks", "--include") or ("eval.tasks",
    "eval.include"). An unknown task or a missing directory is one line."""

    def __init__(self, names: list[str], include: list[str], keys: tuple[str, str] = ("--tasks", "--include")):
        for path in include:
            if not os.path.isdir(path):
                raise UserError(f"{keys[1]} {path}: not a directory")
        # the harness's own thousands of tasks are indexed (seconds) only when a task is not among the included ones
        manager = TaskManager(include_path=list(include), include_defaults=False) if include else None
        if manager is None or any(t not in manager.all_tasks for t in names):
            manager = TaskManager(include_path=list(include) or None)
        if unknown := [t for t in names if t not in manager.all_tasks]:
            where = f"{', '.join(include)} and lm-eval's own tasks" if include else "lm-eval's own tasks"
            raise UserError(f"{keys[0]}: {unknown[0]} is not a task (looked in {where})")
        try:  # their data, loaded once here: a file or dataset that cannot be read is one line now, not later
            get_task_dict(list(names), manager)
        except Exception as e:  # the harness's and the datasets library's errors, of every kind
            raise UserError(f"{keys[0]}: the tasks' data cannot be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.names, self.manager = list(names), manager

    def score(self, model, tokenizer, *, rank: int, world: int, batch_size: int, limit: float | None,
              num_fewshot: int | None, seed: int = 0, reseed: bool = True, chat: bool = False) -> dict | None:
        """The tasks on `model` (eval mode, on its device) by this process's share of the requests; chat: each
        request rendered with the model's chat template, as a user turn (its few-shot examples as earlier turns)."""
        return self.run(ShardlmLM(model, tokenizer, batch_size, rank, world, seed, chat), limit, num_fewshot, seed,
                        reseed)

    def run(self, lm: ShardlmLM, limit: float | None, num_fewshot: int | None, seed: int = 0,
            reseed: bool = True) -> dict | None:
        """lm_eval.simple_evaluate on `lm`: the results on rank 0 (every example's too), None on the others.
        reseed=False leaves the process's random generators alone (inside a run: its dropout, its data); the few-shot
        examples' choice has a generator of its own."""
        seeds = {k: seed if reseed else None for k in ("random_seed", "numpy_random_seed", "torch_random_seed")}
        state = random.getstate()  # the harness draws from Python's generator (its task ids) even when not seeding
        try:
            return lm_eval.simple_evaluate(model=lm, tasks=self.names, num_fewshot=num_fewshot, limit=limit,
                                           task_manager=self.manager, log_samples=True, fewshot_random_seed=seed,
                                           bootstrap_iters=0, apply_chat_template=lm.chat is not None,
                                           fewshot_as_multiturn=lm.chat is not None, **seeds)
        finally:
            if not reseed:
                random.setstate(state)

    @staticmethod
    def metrics(results: dict) -> dict[str, float]:
        """The results' scores as eval/<task>/<metric> (the filter after the metric when it is not "none"), without
        their standard errors."""
        out = {}
        for task, values in results["results"].items():
            for key, value in values.items():
                metric, _, kept = key.partition(",")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric and kept:
                    out[f"eval/{task}/{metric}" + (f"/{kept}" if kept != "none" else "")] = float(value)
        return out

    @staticmethod
    def save(results: dict, out: str) -> str:
        """The harness's results (every example's scores too) to `out` and its table beside it (.md); the table."""
        table = make_table(results)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_write(out, json.dumps(results, indent=1, default=handle_non_serializable, ensure_ascii=False).encode())
        atomic_write(os.path.splitext(out)[0] + ".md", table.encode())
        return table
