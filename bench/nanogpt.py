"""Our CPU pretraining against nanoGPT's CPU baby GPT on tinyshakespeare, side by side in one run, scored the same
way: nats per character of the last 10% of the text (nanoGPT's validation split), 2 threads each.

    python bench/nanogpt.py [--config configs/pretrain/shakespeare-cpu.yaml] [--vocab 1024] [--seeds 1337]
                            [--skip-nanogpt] [key.sub=value ...]

nanoGPT runs from a temporary copy of ../shared/baselines/nanoGPT with the command its SOURCE.md gives (its
README's CPU command, --max_iters=2000); ours trains the config on the first 90% (a sentencepiece tokenizer of
--vocab pieces trained on it). Each is timed from process start to exit (evaluations and checkpoints included),
and each is scored on the validation text by the same procedure: consecutive windows of its own context length,
every token after the first predicted from the earlier ones of its window; total nats / characters predicted.
Without ../shared (the baseline or the text), the script says so and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
BASELINE = os.path.join(SHARED, "baselines", "nanoGPT")
TEXT = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
NANOGPT = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
           "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
           "--lr_decay_iters=2000", "--dropout=0.0"]
THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


@torch.no_grad()
def window_nats(logits_of, ids: np.ndarray, context: int, batch: int = 32) -> float:
    """Summed NLL of ids[1:], in consecutive windows of `context` + 1 ids sharing their ends: each id after the
    first is predicted once, from the earlier ids of its window."""
    starts = list(range(0, len(ids) - 1, context))
    full = [s for s in starts if s + context + 1 <= len(ids)]
    groups = [full[b:b + batch] for b in range(0, len(full), batch)] + [[s] for s in starts if s not in full]
    total = 0.0
    for group in groups:  # full windows in batches; the shorter last one alone
        width = min(context + 1, len(ids) - group[0])
        rows = torch.from_numpy(np.stack([ids[s:s + width] for s in group]).astype(np.int64))
        logits = logits_of(rows[:, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"))
    return total


def run_timed(command: list[str], cwd: str, log: str) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **THREADS})
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:4])} … failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def nanogpt(work: str) -> dict:
    """nanoGPT's baby GPT: trained as SOURCE.md says, scored on its val.bin."""
    copy = os.path.join(work, "nanoGPT")
    shutil.copytree(BASELINE, copy)
    data = os.path.join(copy, "data", "shakespeare_char")
    shutil.copyfile(TEXT, os.path.join(data, "input.txt"))
    prepare = os.path.join(data, "prepare.py")
    with open(prepare) as f:  # its download is skipped when input.txt exists; requests is imported regardless
        source = f.read().replace("import requests\n", "")
    with open(prepare, "w") as f:
        f.write(source)
    subprocess.run([sys.executable, prepare], cwd=copy, check=True, stdout=subprocess.DEVNULL)
    seconds = run_timed([sys.executable, "train.py", *NANOGPT], copy, os.path.join(work, "nanogpt.log"))
    sys.path.insert(0, copy)
    from model import GPT, GPTConfig  # nanoGPT's model.py, from the copy

    state = torch.load(os.path.join(copy, "out-shakespeare-char", "ckpt.pt"), map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
    model.eval()
    val = np.fromfile(os.path.join(data, "val.bin"), dtype=np.uint16)

    def logits_of(x):  # nanoGPT returns the last position's logits unless given targets
        return model(x, targets=x.contiguous())[0]

    nats = window_nats(logits_of, val, state["model_args"]["block_size"])
    return {"seconds": seconds, "nats_per_char": nats / (len(val) - 1), "iters": state["iter_num"]}


def ours(work: str, config: str, vocab: int, seed: int, overrides: list[str]) -> dict:
    sys.path.insert(0, REPO)
    from preprocess.tokenizer import TextTokenizer
    from training.checkpoint.weights import load_for_inference

    text = open(TEXT, encoding="utf-8").read()
    train_text, val_text = text[:int(len(text) * 0.9)], text[int(len(text) * 0.9):]
    data = os.path.join(work, "ours")
    os.makedirs(data, exist_ok=True)
    corpus = os.path.join(data, "train.jsonl")
    if not os.path.exists(corpus):
        with open(corpus, "w") as f:
            f.write(json.dumps({"text": train_text}) + "\n")
        run = [sys.executable, "-m", "preprocess"]
        subprocess.run([*run, "tokenizer", "--input", corpus, "--vocab-size", str(vocab), "--out", f"{data}/tok"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        subprocess.run([*run, "shards", "--input", corpus, "--tokenizer", f"{data}/tok/tokenizer.model", "--out",
                        f"{data}/shards"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    out = os.path.join(work, f"run-{seed}")
    seconds = run_timed([sys.executable, "-m", "training.pretrain", "--config", config, f"data.path={data}/shards",
                         f"out_dir={out}", f"seed={seed}", "log.progress=false", *overrides], REPO,
                        os.path.join(work, f"ours-{seed}.log"))
    model, _ = load_for_inference(out, "cpu")
    sp = TextTokenizer(f"{data}/tok/tokenizer.model")
    ids = np.asarray(sp.encode(val_text))
    first = len(sp.decode([int(ids[0])]))  # the characters of the first token are not predicted
    nats = window_nats(model, ids, seq_len_of(out))
    return {"seconds": seconds, "nats_per_char": nats / (len(val_text) - first), "tokens": len(ids)}


def seq_len_of(run: str) -> int:
    from training.config import config_from_yaml

    return config_from_yaml(os.path.join(run, "config.yaml")).data.seq_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "pretrain", "shakespeare-cpu.yaml"))
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seeds", default="1337")
    ap.add_argument("--skip-nanogpt", action="store_true", help="only our run (while tuning)")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory, removed)")
    args, overrides = ap.parse_known_args()
    if not (os.path.isdir(BASELINE) and os.path.isfile(TEXT)):
        print(f"bench/nanogpt.py: skipped, {BASELINE} or {TEXT} is absent")
        return
    work = args.work or tempfile.mkdtemp(prefix="bench-nanogpt-")
    os.makedirs(work, exist_ok=True)
    try:
        base = None if args.skip_nanogpt else nanogpt(work)
        if base:
            print(f"nanoGPT: {base['seconds']:.1f} s, {base['nats_per_char']:.4f} nats/char (iter {base['iters']})",
                  flush=True)
        results = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            mine = ours(work, args.config, args.vocab, seed, overrides)
            results.append(mine)
            ratio = f", {mine['nats_per_char'] / base['nats_per_char']:.3f}x nanoGPT's" if base else ""
            print(f"ours (seed {seed}): {mine['seconds']:.1f} s, {mine['nats_per_char']:.4f} nats/char{ratio}",
                  flush=True)
        print(f"\n{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{os.path.relpath(args.config, REPO)} {' '.join(overrides)}")
        if base:
            worst = max(r["nats_per_char"] for r in results)
            slowest = max(r["seconds"] for r in results)
            print(f"ours / nanoGPT: {worst / base['nats_per_char']:.3f}x the nats/char (worst seed) in "
                  f"{slowest / base['seconds']:.2f}x the wall-clock")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
