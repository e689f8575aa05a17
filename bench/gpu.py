"""The GPU benchmark: one process on one GPU, bf16, compile on, in one command that ends within its time budget and
needs nothing beyond the repository and its Python packages (bench/device.sh starts it on a bare machine).

    python bench/gpu.py [--out DIR] [--budget-s 320] [--tiny]

What it writes to DIR (gpu.json, gpu.md: nothing else, so that a machine returning few files returns them) and
prints, each figure measured in this one run, in this order (the first ones are the likeliest to fit the budget):
- matmul: the dense bf16 matmul rate this GPU reaches (8192^3, random data), beside its datasheet peak.
- training, per preset (125m, 1b): tokens/s, MFU (against the datasheet peak and against the measured matmul
  rate), peak memory and the host share (the share of step time in which no kernel ran: the GPU waiting for
  the host) of
    ours      `training.run.loop.run` on the preset's config, as `python -m training.pretrain` runs it (data from
              shards, accumulation, clipping, schedule, metrics.jsonl), timed by its own metrics after warm-up;
    ours, document mask (125m): the same with data.document_mask=true (packed documents attend to themselves);
    ours, fsdp2, bf16 weights (125m): the same under dist.backend=fsdp2 on its one process: bf16 weights gathered
              from fp32 shards (the optimizer's masters), where DDP's bf16 is autocast over fp32 weights;
    ours, float8 (1b): the same with train.float8=true (the blocks' linear layers in float8 through torchao,
              where it is installed and the GPU has float8 matmuls; MFU still counted against the bf16 peak);
    baseline  a GPT in nanoGPT's style (LayerNorm, learned positions, GELU MLP of 4 x dim, causal SDPA, tied
              embeddings, fused AdamW, bf16 autocast) with the preset's dim, layers, heads, vocabulary, sequence
              length, micro-batch and accumulation, on token ids already on the GPU, with the same loss as ours
              (models/output.py: the targets' log-probs in chunks, no whole logits), compiled whole with it as
              ours is (train.compile_scope=auto under DDP).
  MFU counts 6 FLOPs per matmul weight per token plus attention (12 x layers x dim x seq_len) for both.
- attention: forward + backward of the 125m model on rows packed with documents of 64-1,024 tokens, each way to
  attend: causal over the whole row (the cost without a mask, wrong for packing), SDPA with a boolean document
  mask and FlexAttention with a block mask; whether flash-attention (varlen) is installed is reported (our model
  has no path for it: PyPI has its source alone, which a machine without network cannot build).

Tokens are sentencepiece pieces of a synthetic corpus made here from a fixed seed (the model's vocabulary padded
to 32,000 as the presets assume), in a scratch directory. Each measurement runs in a process of its own (its
peak memory its own) and is skipped, and said so, when the budget left is too small. --tiny: the tiny preset on CPU, compile
off, a few steps: the same code paths in about a minute (tests/test_gpu_bench.py runs it through device.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train import make_shards, steady_rate  # noqa: E402

from preprocess.errors import UserError  # noqa: E402
from training.config import load_config  # noqa: E402
from training.models import float8  # noqa: E402
from training.models.output import target_logp_sum  # noqa: E402
from training.models.transformer import Transformer  # noqa: E402
from training.run.hooks import Hooks  # noqa: E402
from training.run.metrics import gpu_peak_flops  # noqa: E402

VOCAB = 32000
# (preset, variant): the rows of ours in the training table, in the order they are measured; each variant's
# overrides. The plain rows are followed by the baseline's.
TRAINING = [("125m", "plain"), ("125m", "document mask"), ("125m", "fsdp2, bf16 weights"), ("1b", "plain"),
            ("1b", "float8")]
VARIANTS = {"plain": [], "document mask": ["data.document_mask=true"], "float8": ["train.float8=true"],
            "fsdp2, bf16 weights": ["dist.backend=fsdp2"]}


@dataclasses.dataclass
class Shape:
    """How one training measurement runs: steps of warm-up (compile included), timed, then profiled."""
    config: str
    vocab: int
    micro: int
    grad_accum: int
    warmup: int
    timed: int
    profiled: int
    compile: bool


def shape(preset: str, tiny: bool) -> Shape:
    if tiny:
        return Shape(os.path.join(REPO, "configs", "pretrain", "tiny.yaml"), 4096, 4, 2, 2, 2, 0, False)
    micro = {"125m": 16, "1b": 4}[preset]  # the presets' own micro-batches
    return Shape(os.path.join(REPO, "configs", "pretrain", f"{preset}.yaml"), VOCAB, micro, 2, 4, 8, 2, True)


# ------------------------------------------------------------------------------------------------ the corpus

def synthetic_corpus(path: str, documents: int, seed: int = 0) -> None:
    """JSONL documents of pseudo-words (Zipf-distributed over 6,000 words of 1-4 syllables), 40-700 words each: text
    whose pieces and document lengths look like a corpus's, made without any download."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(6000)]
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    with open(path, "w") as f:
        for _ in range(documents):
            picks = rng.choice(len(words), size=int(rng.integers(40, 700)), p=p)
            text = " ".join(words[i] for i in picks)
            f.write(json.dumps({"text": text[0].upper() + text[1:] + "."}) + "\n")


def make_corpus_shards(out: str, documents: int) -> str:
    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, "corpus.jsonl")
    if not os.path.isfile(corpus):
        synthetic_corpus(corpus, documents)
    return make_shards(out, corpus)


# ------------------------------------------------------------------------------------------- measuring tools

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time in which at least one kernel ran."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class HostShare:
    """Profiles the GPU's kernels over a window of steps: the share of the window's wall time in which none ran
    (the GPU waiting for the host). CUDA only: None elsewhere."""

    def __init__(self, device: torch.device):
        self.device, self.profiler, self.share = device, None, None

    def start(self) -> None:
        if self.device.type != "cuda":
            return
        synchronize(self.device)
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        self.profiler.start()
        self.began = time.perf_counter()

    def stop(self) -> None:
        if self.profiler is None:
            return
        synchronize(self.device)
        wall = time.perf_counter() - self.began
        self.profiler.stop()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            self.profiler.export_chrome_trace(f.name)
            events = json.load(open(f.name)).get("traceEvents", [])
        kernels = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        self.share = max(0.0, 1 - busy_time(kernels) / 1e6 / wall)
        self.profiler = None


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def matmul_rate(tiny: bool) -> dict:
    """FLOP/s of a dense square matmul: bf16 8192^3 on a GPU (fp32 256^3 on CPU with --tiny), after warm-up."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, dtype = (256, torch.float32) if tiny or device.type != "cuda" else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return {"flops": 2 * n**3 * repeats / (time.perf_counter() - start), "n": n, "dtype": str(dtype)}


# ------------------------------------------------------------------------------------------ the two trainers

class Profiled(Hooks):
    """Profiles steps [first, first + count) of our loop (counted from 1), from their first data read."""

    def __init__(self, host: HostShare, first: int, count: int):
        self.host, self.first, self.last = host, first, first + count

    def on_picks(self, step: int, micro: int, picks) -> None:
        if micro == 0 and step == self.first:
            self.host.start()
        elif micro == 0 and step == self.last:
            self.host.stop()


def ours(preset: str, variant: str, shards: str, out: str, tiny: bool) -> dict:
    from training.run.loop import run
    from training.stages.registry import STAGES

    s = shape(preset, tiny)
    steps = s.warmup + s.timed + s.profiled + (1 if s.profiled else 0)  # a step after the window closes it
    out_dir = os.path.join(out, f"run-{preset}-{variant.replace(' ', '-').replace(',', '')}")
    with socket.socket() as free:  # a backend that wants a process group on one process (fsdp2) rendezvous here
        free.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(free.getsockname()[1]))
    cfg = load_config(s.config, [
        f"data.path={shards}", f"out_dir={out_dir}", f"model.vocab_size={s.vocab}", f"train.max_steps={steps}",
        f"train.micro_batch_size={s.micro}", f"train.grad_accum={s.grad_accum}", f"train.compile={str(s.compile).lower()}",
        *VARIANTS[variant], "train.eval_every=0", "train.sample_prompt=null",
        "train.warmup_steps=2", f"log.every={s.warmup}", "log.progress=false", "train.device=auto"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    host = HostShare(device)
    with contextlib.redirect_stdout(sys.stderr):
        run(STAGES["pretrain"](cfg), cfg, Profiled(host, s.warmup + s.timed + 1, s.profiled), saves=False)
    lines = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if '"loss"' in line]
    rate = steady_rate(out_dir, after=s.warmup, until=s.warmup + s.timed)["rate"]  # intervals of log.every=warmup
    return {"rate": rate, "flops_per_token": flops_per_token_of(cfg, s.vocab), "peak_gib": peak_memory_gib(device),
            "host_share": host.share, "loss": lines[-1]["loss"]}


def flops_per_token_of(cfg, vocab: int) -> float:
    with torch.device("meta"):
        return Transformer(dataclasses.replace(cfg.model, vocab_size=vocab)).flops_per_token(cfg.data.seq_len)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.up, self.down = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx, targets):
        """The summed log-probs of the targets, through our chunked output layer, as ours computes its loss."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return target_logp_sum(self.ln(x), self.head.weight, targets)

    def flops_per_token(self, seq_len: int) -> float:
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * weights + 12 * len(self.blocks) * self.tok.embedding_dim * seq_len


def baseline(preset: str, tiny: bool) -> dict:
    s = shape(preset, tiny)
    cfg = load_config(s.config, ["data.path=unused"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq = cfg.data.seq_len
    torch.manual_seed(0)
    model = GPT(s.vocab, cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, seq).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if s.compile else model
    data = torch.randint(0, s.vocab, (s.grad_accum, s.micro, seq + 1), device=device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    host, start = HostShare(device), None
    for step in range(s.warmup + s.timed + s.profiled):
        if step == s.warmup:
            synchronize(device)
            start = time.perf_counter()
        if step == s.warmup + s.timed:
            synchronize(device)
            seconds = time.perf_counter() - start
            host.start()
        for m in range(s.grad_accum):
            with bf16:
                loss = -step_model(data[m, :, :-1], data[m, :, 1:])
            (loss / (s.micro * seq * s.grad_accum)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    host.stop()
    if not s.profiled:
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"rate": s.grad_accum * s.micro * seq * s.timed / seconds, "flops_per_token": model.flops_per_token(seq),
            "peak_gib": peak_memory_gib(device), "host_share": host.share}


# ------------------------------------------------------------------------------------------- attention paths

def packed_segments(micro: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of documents of 64-1,024 tokens: each position's document number."""
    lengths = torch.randint(64, 1025, (micro, seq // 64 + 1), generator=generator)
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), row)[:seq] for row in lengths])


def attention(tiny: bool) -> dict:
    """ms per forward + backward of packed rows through the 125m model (tiny: the tiny preset), each way to attend."""
    s = shape("125m", tiny)
    cfg = load_config(s.config, ["data.path=unused"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq, micro = cfg.data.seq_len, s.micro
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(cfg.model, vocab_size=s.vocab)).to(device)
    tokens = torch.randint(0, s.vocab, (micro, seq + 1), device=device)
    segments = packed_segments(micro, seq, torch.Generator().manual_seed(0)).to(device)
    ways = {"causal over the whole row (no mask)": ("sdpa", None), "SDPA, boolean document mask": ("sdpa", segments)}
    skipped = {}
    if device.type == "cuda":
        ways["FlexAttention, block mask"] = ("flex", segments)
    else:
        skipped["FlexAttention, block mask"] = "no backward on CPU"
    installed = importlib.util.find_spec("flash_attn") is not None
    skipped["flash-attention varlen"] = f"flash_attn {'installed' if installed else 'not installed'}; no model path"
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    repeats = 2 if tiny else 10
    times = {}
    for name, (impl, segs) in ways.items():
        model.attention_impl = impl
        for step in range(repeats + 3):
            if step == 3:
                synchronize(device)
                start = time.perf_counter()
            with bf16:
                loss = -model(tokens[:, :-1], segments=segs, targets=tokens[:, 1:], summed=True)
            loss.backward()
            model.zero_grad(set_to_none=True)
        synchronize(device)
        times[name] = 1e3 * (time.perf_counter() - start) / repeats
    return {"micro": micro, "seq": seq, "ms": times, "skipped": skipped}


# ----------------------------------------------------------------------------------------------- the report

def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def gib(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def report(results: dict) -> str:
    peak, measured = results["datasheet_peak"], results.get("matmul", {}).get("flops")
    lines = [f"{results['device']}, torch {results['torch']}, {results['when']}; {results['budget']}",
             "", f"matmul: {measured / 1e12:.3g} TFLOP/s measured ({results['matmul']['n']}^3, "
                 f"{results['matmul']['dtype']})" + (f", datasheet {peak / 1e12:.0f}" if peak else "")
             if measured else "matmul: not measured", "",
             "| preset | loop | tokens/s | MFU (datasheet) | MFU (measured matmul) | peak GiB | host share | ours / baseline |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["training"]:
        if "skipped" in row:
            lines.append(f"| {row['preset']} | {row['loop']} | skipped: {row['skipped']} | | | | | |")
            continue
        work = row["rate"] * row["flops_per_token"]
        ratio = row.get("vs_baseline")
        lines.append(f"| {row['preset']} | {row['loop']} | {row['rate']:,.0f} | {pct(work / peak if peak else None)} | "
                     f"{pct(work / measured if measured else None)} | {gib(row['peak_gib'])} | "
                     f"{pct(row['host_share'])} | {'–' if ratio is None else f'{ratio:.2f}'} |")
    att = results.get("attention")
    if att:
        if "skipped" in att and isinstance(att["skipped"], str):
            lines += ["", f"attention: skipped: {att['skipped']}"]
        else:
            base = next(iter(att["ms"].values()))
            lines += ["", f"attention, forward + backward of {att['micro']} x {att['seq']} packed tokens:", "",
                      "| way | ms | x causal |", "|---|---:|---:|"]
            lines += [f"| {name} | {ms:.1f} | {ms / base:.2f} |" for name, ms in att["ms"].items()]
            lines += [f"| {name} | skipped: {why} | |" for name, why in att["skipped"].items()]
    return "\n".join(lines) + "\n"


def worker(job: dict) -> dict:
    if job["part"] == "matmul":
        return matmul_rate(job["tiny"])
    if job["part"] == "ours":
        return ours(job["preset"], job["variant"], job["shards"], job["out"], job["tiny"])
    if job["part"] == "baseline":
        return baseline(job["preset"], job["tiny"])
    return attention(job["tiny"])


def in_process(job: dict, deadline: float) -> dict:
    """A job in a process of its own, given the time left: its result, or {"skipped": why}."""
    left = deadline - time.monotonic()
    if left < 20:
        return {"skipped": "time budget spent"}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], cwd=REPO, timeout=left,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"ran past the time budget ({left:.0f} s left)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"skipped": f"failed (exit {proc.returncode}): {tail[:200]}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "gpu"))
    ap.add_argument("--budget-s", type=float, default=320, help="stop starting measurements after this (seconds)")
    ap.add_argument("--work", help="scratch directory: corpus, shards, runs (default: a temporary one, removed)")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset, compile off, few steps (a CPU check)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    deadline = time.monotonic() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="shardlm-gpu-"))
        results = measure(args, deadline, work)
    table = report(results)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(table)
    print(table)


def float8_refusal(device: torch.device) -> str | None:
    """Why train.float8 cannot run here (training's own one line), or None."""
    try:
        float8.check(device)
    except UserError as e:
        return str(e)
    return None


def measure(args, deadline: float, work: str) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
               "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"), "datasheet_peak": gpu_peak_flops(device),
               "budget": f"budget {args.budget_s:.0f} s" + (", tiny" if args.tiny else ""), "training": []}
    shards = make_corpus_shards(os.path.join(work, "data"), 100 if args.tiny else 3000)
    results["matmul"] = in_process({"part": "matmul", "tiny": args.tiny}, deadline)
    results["attention"] = in_process({"part": "attention", "tiny": args.tiny}, deadline)
    for preset, variant in [r for r in TRAINING if r[0] == "125m"] + [("125m", "float8")] if args.tiny else TRAINING:
        name = "tiny" if args.tiny else preset
        refused = float8_refusal(device) if variant == "float8" else None
        mine = {"skipped": refused} if refused else in_process(
            {"part": "ours", "preset": preset, "variant": variant, "shards": shards, "out": work, "tiny": args.tiny},
            deadline)
        results["training"].append({"preset": name, "loop": "ours" + ("" if variant == "plain" else f", {variant}"),
                                    **mine})
        if variant != "plain":
            continue
        base = in_process({"part": "baseline", "preset": preset, "tiny": args.tiny}, deadline)
        results["training"].append({"preset": name, "loop": "nanoGPT-style", **base})
        if "rate" in mine and "rate" in base:
            results["training"][-2]["vs_baseline"] = mine["rate"] / base["rate"]
    return results


if __name__ == "__main__":
    main()
