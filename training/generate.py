"""Text generation with a KV cache.

    python -m training.generate --checkpoint RUN_OR_CKPT_DIR --prompt TEXT [--max-new-tokens N]
                                [--temperature T] [--top-k K] [--top-p P] [--greedy] [--seed S] [--chat]

Many prompts, several samples each, batched and on several processes: python -m training.sample.
"""

from __future__ import annotations

import argparse
import sys

import torch

from preprocess.errors import exit_code

from .checkpoint.weights import load_for_inference
from .models.decoding import chat_reply, generate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set holding this probability")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user turn and print the assistant's reply")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    return exit_code(lambda: print(run_generate(args)))


def run_generate(args) -> str:
    model, sp = load_for_inference(args.checkpoint, args.device)
    if args.chat:
        return chat_reply(model, sp, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.greedy,
                          args.seed, args.top_p)
    generator = torch.Generator().manual_seed(args.seed)
    ids = generate(model, sp.encode(args.prompt), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, eos_id=sp.eos_id, vocab_limit=sp.vocab_size,
                   generator=generator)
    return args.prompt + sp.decode(ids)


if __name__ == "__main__":
    sys.exit(main())
