"""Text generation with a KV cache.

    python -m training.generate --checkpoint RUN_OR_CKPT_DIR --prompt TEXT [--max-new-tokens N]
                                [--temperature T] [--top-k K] [--top-p P] [--greedy] [--seed S] [--chat]

Many prompts, several samples each, batched and on several processes: python -m training.sample.
"""

from __future__ import annotations

import argparse
import sys

import torch

from preprocess.errors import UserError, exit_code

from .model import KVCache, Transformer


def pick_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               greedy: bool = False, vocab_limit: int | None = None, generator: torch.Generator | None = None) -> int:
    """The next token from one position's logits: the most likely (greedy, or temperature 0), else sampled at
    `temperature` from the top_k most likely and the smallest set of those holding top_p of the probability.
    Ids >= vocab_limit (the padding of a rounded-up vocabulary) are never chosen."""
    logits = logits.float().clone()
    if vocab_limit is not None:
        logits[vocab_limit:] = -float("inf")
    if greedy or temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered >= top_p  # tokens after the nucleus is full
        probs[order[outside]] = 0
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, eos_id: int | None = None, vocab_limit: int | None = None,
             generator: torch.Generator | None = None, follow=None) -> list[int]:
    """New token ids after `prompt` (stops at eos or the model's context). Ids >= vocab_limit (the padding of a
    rounded-up vocabulary) are never produced. `follow(token) -> token` replaces each chosen token, e.g. by
    another process's choice, so that several processes generate the same ids step by step."""
    cfg = model.cfg
    device = next(model.parameters()).device
    prompt = prompt[-(cfg.max_seq_len - 1):] or [eos_id if eos_id is not None else 0]
    total = min(cfg.max_seq_len, len(prompt) + max_new_tokens)
    cache = KVCache(cfg, 1, total, device, next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt], device=device), cache)[0, -1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = pick_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                           vocab_limit=vocab_limit, generator=generator)
        if follow is not None:
            token = follow(token)
        if token == eos_id:
            break
        out.append(token)
        if cache.length >= total:
            break
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
    return out


def chat_prompt(sp, turns) -> list[int]:
    """The ids that ask for the assistant's reply after `turns` (preprocess.chat.Turn), rendered with the chat
    template; the reply ends at template.end_id (<|end|>)."""
    import numpy as np

    from preprocess.chat import ChatTemplate

    return ChatTemplate(sp.info).prompt(turns, [np.array(sp.encode(t.text)) for t in turns])


def chat_reply(model: Transformer, sp, text: str, max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int = 50, greedy: bool = False, seed: int = 0, top_p: float = 1.0) -> str:
    """The assistant's reply to one user turn, rendered with the chat template; stops at <|end|>."""
    from preprocess.chat import ChatTemplate, Turn

    prompt = chat_prompt(sp, [Turn("user", text)])
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ids = generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                   eos_id=ChatTemplate(sp.info).end_id, vocab_limit=sp.vocab_size, generator=generator)
    return sp.decode(ids)


def load_for_inference(checkpoint: str, device: str = "auto"):
    """(model in eval mode, its tokenizer) from a run or checkpoint directory."""
    from preprocess.tokenizer import TextTokenizer, tokenizer_file

    from . import checkpoint as ckpt

    ckpt_dir = ckpt.resolve(checkpoint)
    model = Transformer(ckpt.model_config(ckpt_dir))
    ckpt.load_weights(ckpt_dir, model)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    path = tokenizer_file(ckpt_dir)
    if path is None:
        raise UserError(f"{ckpt_dir}: has no tokenizer.model or tokenizer.json")
    sp = TextTokenizer(path)
    return model.to(dev).eval(), sp


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
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    ids = generate(model, sp.encode(args.prompt), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, eos_id=sp.eos_id, vocab_limit=sp.vocab_size,
                   generator=generator)
    return args.prompt + sp.decode(ids)


if __name__ == "__main__":
    sys.exit(main())
