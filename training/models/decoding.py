"""Decoding with a KV cache: one sequence (generate), or many rows at once, left-padded, each as it would decode
alone (sample_batch); the next token of each row of logits (pick_tokens), or of one position's (pick_token); a
chat turn's prompt and reply.

Used by training.generate, training.sample, the samples of evaluation and the recipes."""

from __future__ import annotations

import hashlib

import torch

from preprocess import hf_tokenizer
from preprocess.chat import Turn
from preprocess.chat_template import template_for
from preprocess.errors import UserError

from .transformer import KVCache, Transformer


class NonFiniteLogits(UserError, FloatingPointError):
    """Logits that no distribution can be drawn from (NaN, +inf, or all -inf): diverged or broken weights."""


DRAW_RULE = "inverse-cdf/1"  # how a uniform becomes a token: a change here changes every sample drawn from a seed
CHUNK_ROWS = 64  # rows filtered and drawn at once: the sort and the cumulative sums hold ~40 bytes per row x vocab


def pick_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, greedy: bool = False, vocab_limit: int | None = None) -> torch.Tensor:
    """The next token of each row of `logits` [rows, vocab]: the most likely (greedy, or temperature 0: uniforms
    unused), else sampled at `temperature` from the top_k most likely and the smallest set of those holding top_p of
    the probability, by the inverse of the row's cumulative distribution at its uniform in [0, 1) — so all rows
    draw in a few batched operations, and a row's token depends only on its logits and its uniform. Ids >=
    vocab_limit (the padding of a rounded-up vocabulary) are never chosen. A sampled row that holds NaN or +inf, or
    only -inf, raises NonFiniteLogits (greedy takes the argmax unchecked)."""
    options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "greedy": greedy, "vocab_limit": vocab_limit}
    if len(logits) > CHUNK_ROWS:
        return torch.cat([pick_tokens(part, None if uniforms is None else uniforms[i:i + CHUNK_ROWS], **options)
                          for i, part in zip(range(0, len(logits), CHUNK_ROWS), logits.split(CHUNK_ROWS), strict=True)])
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_limit:] = -float("inf")
    if not draws(greedy, temperature):
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, -1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0)  # the tokens after the nucleus is full
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):  # NaN would search past the vocabulary
        raise NonFiniteLogits("sampling: the model's logits hold NaN or infinity (diverged weights?)")
    # strictly below the total, so the first token whose cumulative sum passes it has a probability above 0
    point = torch.minimum(uniforms.to(cdf).view(-1, 1) * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, point, right=True)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


def draws(greedy: bool, temperature: float) -> bool:
    """Whether a token is drawn (from a uniform), not taken as the most likely."""
    return not greedy and temperature > 0


def uniforms_of(generators: list[torch.Generator]) -> torch.Tensor:
    """One uniform in [0, 1) from each row's (CPU) generator: what pick_tokens draws that row's next token with."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


def pick_token(logits: torch.Tensor, *, generator: torch.Generator | None = None, greedy: bool = False,
               **options) -> int:
    """pick_tokens for one position's logits, with a uniform from `generator` (the global CPU one if None) for
    each token drawn; greedy draws none."""
    drawn = draws(greedy, options.get("temperature", 1.0))
    uniforms = uniforms_of([generator if generator is not None else torch.default_generator]) if drawn else None
    return int(pick_tokens(logits.unsqueeze(0), uniforms, greedy=greedy, **options)[0])


def sample_seed(*names) -> int:
    """The seed of one sample's generator, from what names it (training.sample: seed, prompt, sample; GRPO: seed,
    the prompt's position, the completion): the same on any process."""
    digest = hashlib.blake2b(":".join(map(str, names)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def stop_set(stop) -> frozenset:
    """The ids a reply ends at: one id, several (a chat template's end-of-turn ids), or None."""
    return frozenset(() if stop is None else (stop,) if isinstance(stop, int) else stop)


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, eos_id=None, vocab_limit: int | None = None,
             generator: torch.Generator | None = None, follow=None) -> list[int]:
    """New token ids after `prompt` (stops at eos_id — one id or several — or the model's context). Ids >=
    vocab_limit (the padding of a rounded-up vocabulary) are never produced. `follow(token) -> token` replaces each
    chosen token, e.g. by another process's choice, so that several processes generate the same ids step by step."""
    cfg = model.cfg
    device = next(model.parameters()).device
    stops = stop_set(eos_id)
    prompt = prompt[-(cfg.max_seq_len - 1):] or [min(stops, default=0)]
    total = min(cfg.max_seq_len, len(prompt) + max_new_tokens)
    cache = KVCache(cfg, 1, total, device, next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt], device=device), cache)[0, -1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = pick_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                           vocab_limit=vocab_limit, generator=generator)
        if follow is not None:
            token = follow(token)
        if token in stops:
            break
        out.append(token)
        if cache.length >= total:
            break
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
    return out


def chat_prompt(sp, turns) -> tuple[list[int], list[int]]:
    """(the ids that ask for the assistant's reply after `turns` (preprocess.chat.Turn), the ids that end the
    reply), with the tokenizer's chat template: its model's (a tokenizer.json's), or ours (<|end|>)."""
    template = tokenizer_template(sp.info)
    return template.prompt_ids(turns, sp.encode), reply_end_ids(sp.info, template)


def reply_end_ids(info, template) -> list[int]:
    """Every id a reply ends at: the end of turn the template writes after a reply, the tokenizer's eos, and the
    other ends of a model's vocabulary (Llama 3's <|eom_id|> after a tool call and <|end_of_text|>)."""
    named = hf_tokenizer.end_ids(info.path) if info.kind == "hf" else []
    return list(dict.fromkeys([*template.end_ids(), info.eos_id, *named]))


_templates: dict[tuple[str, str], object] = {}


def tokenizer_template(info):
    """The tokenizer's chat template, found (its files read) once per process: training.sample asks for every
    prompt."""
    key = (info.path, info.sha256)
    if key not in _templates:
        _templates[key] = template_for(info)
    return _templates[key]


def chat_reply(model: Transformer, sp, text: str, max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int = 50, greedy: bool = False, seed: int = 0, top_p: float = 1.0) -> str:
    """The assistant's reply to one user turn, rendered with the chat template; stops at its end of turn."""
    prompt, stop = chat_prompt(sp, [Turn("user", text)])
    generator = torch.Generator().manual_seed(seed)
    ids = generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                   eos_id=stop, vocab_limit=sp.vocab_size, generator=generator)
    return sp.decode(ids)


@torch.no_grad()
def sample_batch(model: Transformer, prompts: list[list[int]], stops: list, seeds: list[int],
                 max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, vocab_limit: int | None = None, with_stop: bool = False,
                 lockstep=None) -> tuple[list[list[int]], list[bool]]:
    """New ids after each prompt, and whether each ended at one of its stop ids (stops[r]: one id, several or None),
    all rows decoded together: left-padded to the longest prompt, one KV cache, each row drawing from its own
    generator and ending as training.generate would end it alone (its stop id, max_new_tokens, or its own end of
    the context). with_stop: a row that stopped ends with the stop id it drew. lockstep(live, failed) -> (whether
    any process still has a live row, whether any failed to draw): every process then runs as many forwards (a
    sharded model gathers its weights in each), and all raise NonFiniteLogits at the same step."""
    cfg = model.cfg
    device = next(model.parameters()).device
    stops = [stop_set(stop) for stop in stops]
    prompts = [p[-(cfg.max_seq_len - 1):] or [min(stop, default=0)] for p, stop in zip(prompts, stops, strict=True)]
    longest = max((len(p) for p in prompts), default=1)
    limits = [min(max_new_tokens, cfg.max_seq_len - len(p) + 1) for p in prompts]  # generate()'s count
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts] or [[0]], device=device)
    if not prompts:  # a process with nothing to sample that keeps step with the others
        pad = torch.zeros(1, dtype=torch.long, device=device)
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # on the CPU: the same draws on any device
    steps = max_new_tokens if lockstep is not None else max(limits, default=1)
    cache = KVCache(cfg, len(tokens), longest + steps, device, next(model.parameters()).dtype)
    logits = model(tokens, cache, pad=pad)[:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    live = list(range(len(prompts)))
    failure = None
    while True:
        # finished rows are fed a token that no live row attends to
        chosen = torch.zeros(len(tokens), dtype=torch.long, device=device)
        drawn: list[int] = []
        if live:
            index = torch.tensor(live, device=device)
            try:
                uniforms = uniforms_of([generators[r] for r in live]) if draws(greedy, temperature) else None
                picked = pick_tokens(logits[index], uniforms,
                                     temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                     vocab_limit=vocab_limit)
            except NonFiniteLogits as e:
                if lockstep is None:
                    raise
                failure, live = e, []  # told to every process below, before any waits for this one
            else:
                chosen[index], drawn = picked, picked.tolist()
        for r, token in zip(live, drawn, strict=True):
            if token in stops[r]:
                stopped[r] = True
                if with_stop:
                    out[r].append(token)
            else:
                out[r].append(token)
        live = [r for r in live if not stopped[r] and len(out[r]) < limits[r]]
        # a forward only for a token some row will still draw after: never past the prompt + max_new_tokens - 1
        # positions that a row of the longest allowed prompt holds
        going, failed = lockstep(bool(live), failure is not None) if lockstep is not None else (bool(live), False)
        if failed:
            raise failure or NonFiniteLogits("sampling: another process's logits hold NaN or infinity")
        if not going:
            return out, stopped
        logits = model(chosen.unsqueeze(1), cache, pad=pad)[:, -1]
