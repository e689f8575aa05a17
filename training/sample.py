"""Batched sampling: K completions for every prompt of a file, with a KV cache, on one process or every rank of
a torchrun job, resumable.

    python -m training.sample --checkpoint RUN_OR_HF_DIR --prompts FILE.jsonl --samples K --out FILE.jsonl
                              [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--greedy]
                              [--seed S] [--chat] [--batch-size ROWS]
    torchrun --nproc_per_node N -m training.sample ...

Each line of the prompts file is a JSON string or an object with "prompt" (a string) or "messages" (a
conversation, rendered with the chat template; so is every prompt with --chat, as a user turn). Each line of the
output is {"index": i, "prompt": <the line's value>, "samples": [K strings], "stopped": [K booleans: whether
each ended by itself], "chat": whether the replies are chat turns}, in prompt order. A prompt that leaves no
room in the model's context for a new token is refused, not cut.

The output depends only on the checkpoint, the prompts and the options, never on the number of processes:
batches are runs of consecutive prompts (--batch-size rows of prompts x samples), batch b goes to rank
b mod world, and the randomness of sample k of prompt i comes from a generator seeded by (seed, i, k) alone.
Rows are left-padded to the batch's longest prompt and compute as they would alone. Every batch is written to
OUT.parts/ when done, so a re-run after a crash or kill samples only the batches that are missing; the parts are
merged into OUT at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback

import torch

from preprocess.errors import UserError, environment_error, exit_code
from preprocess.fileio import atomic_write, file_sha256, numbered_lines
from preprocess.formats import Bad, Turn, messages_to_turns

from .checkpoint.weights import load_for_inference, resolve, weights_fingerprint
from .models.decoding import DRAW_RULE, chat_prompt, sample_batch, sample_seed
from .models.transformer import Transformer
from .parallel import env as D


def read_prompts(path: str) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line: a string, or an object with "prompt" or "messages"."""
    prompts = []
    for number, line in numbered_lines(path):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not JSON ({e.msg})") from None
        ok = isinstance(value, str) or (isinstance(value, dict) and (
            isinstance(value.get("prompt"), str) != isinstance(value.get("messages"), list)))
        if not ok:
            raise UserError(f"{path}:{number}: expected a JSON string or an object with either \"prompt\" (a string) "
                            "or \"messages\" (a list)")
        prompts.append((number, value))
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def prompt_ids(sp, value, chat: bool, where: str) -> tuple[list[int], object, bool]:
    """(ids, the id or ids that end a reply, whether the reply is a chat turn): a chat prompt (--chat, or any
    "messages") ends at the chat template's end of turn, plain text at eos."""
    if isinstance(value, dict) and "messages" in value:
        turns = messages_to_turns(value["messages"], "messages")
        if isinstance(turns, Bad):
            raise UserError(f"{where}: {turns.detail}")
        if turns and turns[-1].role == "assistant":
            raise UserError(f"{where}: the last message is the assistant's; a prompt ends before the reply")
    else:
        text = value if isinstance(value, str) else value["prompt"]
        if not chat:
            return sp.encode(text), sp.eos_id, False
        turns = [Turn("user", text)]
    try:
        return *chat_prompt(sp, turns), True
    except UserError as e:  # the template refuses this prompt: say which one
        raise UserError(f"{where}: {e}") from None


def prompt_batches(count: int, batch_size: int, n: int) -> list[range]:
    """The batches of `count` prompts: runs of consecutive prompts, batch_size // n of them (at least one), so
    that a batch's rows are whole prompts' samples."""
    per_batch = max(1, batch_size // n)
    return [range(first, min(first + per_batch, count)) for first in range(0, count, per_batch)]


def sample_chunk(model: Transformer, sp, encoded: list, chunk: range, n: int, seed: int, *, max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float = 1.0,
                 greedy: bool = False) -> list[tuple[list[str], list[bool]]]:
    """n samples of each prompt of `chunk` (encoded[i]: its ids and stop id), decoded together; for each
    prompt its texts and whether each ended by itself."""
    rows = [(i, k) for i in chunk for k in range(n)]
    ids, stopped = sample_batch(model, [encoded[i][0] for i, _ in rows], [encoded[i][1] for i, _ in rows],
                                [sample_seed(seed, i, k) for i, k in rows], max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                vocab_limit=sp.vocab_size)
    texts = [sp.decode(r) for r in ids]
    return [(texts[j * n:(j + 1) * n], stopped[j * n:(j + 1) * n]) for j in range(len(chunk))]


def options_of(args, checkpoint: str, prompts_path: str, device: torch.device) -> dict:
    return {"checkpoint": weights_fingerprint(checkpoint), "prompts": file_sha256(prompts_path),
            "device": device.type,  # the logits a seed's uniforms meet differ between device types
            "draws": DRAW_RULE,  # parts drawn by another rule would mix two samplers in one file
            **{k: getattr(args, k) for k in ("n", "max_new_tokens", "temperature", "top_k", "top_p", "greedy",
                                             "seed", "chat", "batch_size")}}


def run_sample(args) -> str | None:
    """The samples of this rank's batches into OUT.parts/, then (rank 0) the merged OUT; the summary line, on
    rank 0 only. An error on any rank stops every rank with one line."""
    # ranks wait for the slowest at the end; an error anywhere is shared before that wait (below)
    env = D.init("ddp", args.device, 86_400)
    try:
        # read on rank 0 and shared: a file missing on one node is then one line on every rank, not a wait
        numbered = D.from_rank0(env, lambda: read_prompts(args.prompts))
        lines, prompts = [n for n, _ in numbered], [v for _, v in numbered]
        checkpoint = D.from_rank0(env, lambda: resolve(args.checkpoint))
        options = D.from_rank0(env, lambda: options_of(args, checkpoint, args.prompts, env.device))
        parts = args.out + ".parts"
        meta = args.out + ".options.json"
        done = D.from_rank0(env, lambda: claim(args.out, parts, meta, options))
        if done:
            return f"{args.out}: already holds these samples ({len(prompts):,} prompts); nothing to do" \
                if env.is_main else None
        if not D.all_reduce_min(env, int(os.path.isdir(parts))):  # every rank writes into rank 0's directory
            raise UserError(f"{parts}: not visible on every node; --out must be on a file system all ranks share")
        wrote, problem = 0, None
        try:
            wrote = sample_share(args, prompts, lines, checkpoint, parts, env)
        except Exception as e:  # shared below, so that no rank waits for this one; a bug keeps its traceback here
            if not isinstance(e, (UserError, OSError)):
                traceback.print_exc()
            problem = str(e) if isinstance(e, UserError) else environment_error(e) if isinstance(e, OSError) \
                else f"{type(e).__name__}: {e}"
        failed = int(D.all_reduce_sum(env, torch.tensor(int(problem is not None), device=env.device)))
        if failed:
            raise UserError(problem or f"another rank failed ({failed} of {env.world_size}); its error is above")
        batches = len(prompt_batches(len(prompts), args.batch_size, args.n))
        D.from_rank0(env, lambda: merge(parts, args.out, meta, batches, options))
        total = int(D.all_reduce_sum(env, torch.tensor(wrote, device=env.device)))
        return (f"{args.out}: {len(prompts):,} prompts x {args.n} samples ({total:,} prompts sampled now, the rest "
                f"were there)") if env.is_main else None
    finally:
        D.shutdown(env)


def sample_share(args, prompts: list, lines: list[int], checkpoint: str, parts: str, env) -> int:
    """This rank's missing batches (batch b is rank b mod world's), each written to parts/ when done; the
    number of prompts sampled."""
    mine = [(b, chunk) for b, chunk in enumerate(prompt_batches(len(prompts), args.batch_size, args.n))
            if b % env.world_size == env.rank and not os.path.exists(os.path.join(parts, f"batch-{b:06d}.jsonl"))]
    if not mine:
        return 0
    model, sp = load_for_inference(checkpoint, str(env.device))
    encoded = []
    for line, value in zip(lines, prompts, strict=True):  # every rank with work checks them all
        where = f"{args.prompts}:{line}"
        encoded.append(prompt_ids(sp, value, args.chat, where))
        if len(encoded[-1][0]) > model.cfg.max_seq_len - 1:
            raise UserError(f"{where}: the prompt is {len(encoded[-1][0]):,} tokens; the model's context holds "
                            f"{model.cfg.max_seq_len:,} (prompt and at least one new token)")
    wrote = 0
    for b, chunk in mine:
        path = os.path.join(parts, f"batch-{b:06d}.jsonl")
        drawn = sample_chunk(model, sp, encoded, chunk, args.n, args.seed, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)
        records = [json.dumps({"index": i, "prompt": prompts[i], "samples": texts, "stopped": ends,
                               "chat": encoded[i][2]}, ensure_ascii=False)
                   for i, (texts, ends) in zip(chunk, drawn, strict=True)]
        atomic_write(path, ("\n".join(records) + "\n").encode())
        wrote += len(chunk)
    return wrote


def claim(out: str, parts: str, meta: str, options: dict) -> bool:
    """True when `out` holds these samples already; else the parts directory, checked to be of these options."""
    if os.path.exists(out):
        written = json.load(open(meta)) if os.path.exists(meta) else None
        if written == options:
            shutil.rmtree(parts, ignore_errors=True)  # left by a run stopped between the merge and its clean-up
            return True
        raise UserError(f"{out}: exists, {differs(written, options)[0]} (see {meta}); choose another --out or "
                        "remove it")
    os.makedirs(parts, exist_ok=True)
    recorded = os.path.join(parts, "options.json")
    if os.path.exists(recorded):
        written = json.load(open(recorded))
        if written != options:
            why, rerun = differs(written, options)
            raise UserError(f"{parts}: parts of an unfinished run {why}; {'rerun with those, or ' if rerun else ''}"
                            "remove the directory")
    else:
        atomic_write(recorded, json.dumps(options, indent=1).encode())
    return False


def differs(written: dict | None, options: dict) -> tuple[str, bool]:
    """(how recorded options differ from these, whether a run with the recorded ones could finish the parts): only
    in the sampler's draw rule (older code: no flag brings it back), or otherwise."""
    if written is not None and {**written, "draws": options["draws"]} == options:
        return f"drawn by another sampler ({written.get('draws', 'multinomial')}; this one draws by " \
               f"{options['draws']})", False
    return "written with other options or prompts", True


def merge(parts: str, out: str, meta: str, batches: int, options: dict) -> None:
    """The parts, in batch order, into `out`; then the parts go."""
    files = [os.path.join(parts, f"batch-{b:06d}.jsonl") for b in range(batches)]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise UserError(f"{missing[0]}: missing after every rank finished; run the same command again")
    atomic_write(meta, json.dumps(options, indent=1).encode())
    atomic_write(out, b"".join(open(f, "rb").read() for f in files))
    shutil.rmtree(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run, a checkpoint or a transformers model directory")
    p.add_argument("--prompts", required=True, help="JSONL: a string, or {\"prompt\"} or {\"messages\"} per line")
    # --samples under torchrun: torchrun reads every --n... option as an abbreviation of its own --nnodes etc.
    p.add_argument("--samples", "--n", dest="n", type=int, default=1,
                   help="samples per prompt (write --samples under torchrun, which takes --n for its own options)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--chat", action="store_true", help="a string prompt is a user turn; samples are replies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="rows (prompts x samples) decoded together")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--samples, --batch-size and --max-new-tokens must be at least 1")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    def run() -> None:
        line = run_sample(args)
        if line:
            print(line)

    return D.run_command(lambda: exit_code(run))


if __name__ == "__main__":
    sys.exit(main())
