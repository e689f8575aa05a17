"""MPI preprocessing on a skewed corpus: units handed out by rank 0 (largest first) against the static split.

    python bench/mpi_skew.py [--ranks 2] [--repeat 2] [--out bench_out/mpi_skew]

The corpus: one large file of Tang poems (a .json array, so one work unit: the straggler) among small English
jsonl files (Gutenberg passages) from ../shared/data. Both runs are `mpirun -n R python -m preprocess shards
--workers 1`; the static one sets SHARDLM_MPI=0, so each rank takes every R-th unit as under srun. The shard
directories must be byte-identical; the figure is the ratio of wall times, alternating runs.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")


def digest(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def write_corpus(out: str, cjk_mb: float, english_files: int, english_copies: int) -> tuple[int, int]:
    os.makedirs(out, exist_ok=True)
    poems = []
    for path in sorted(glob.glob(os.path.join(SHARED, "tang_poems", "poet.tang.*.json"))):
        poems += [p["title"] + "\n" + "\n".join(p["paragraphs"]) + "\n" for p in json.load(open(path, encoding="utf-8"))]
    records, size, copy = [], 0, 0
    while size < cjk_mb * 1e6:
        for p in poems:
            records.append({"text": f"{copy} {p}"})
            size += len(p.encode()) + 20
        copy += 1
    with open(os.path.join(out, "a-tang.json"), "w", encoding="utf-8") as f:  # one unit, first in the plan
        json.dump(records, f, ensure_ascii=False)
    books = sorted(glob.glob(os.path.join(SHARED, "gutenberg_nltk", "*.txt")))
    passages = []
    for path in books:
        text = open(path, encoding="utf-8", errors="replace").read()
        passages += [text[i:i + 4000] for i in range(0, len(text), 4000)]
    per_file = len(passages) * english_copies // english_files
    for k in range(english_files):
        with open(os.path.join(out, f"b-english-{k:02d}.jsonl"), "w", encoding="utf-8") as f:
            for j in range(per_file):
                f.write(json.dumps({"text": f"{k} {j} " + passages[(k * per_file + j) % len(passages)]}) + "\n")
    files = glob.glob(os.path.join(out, "*"))
    return sum(os.path.getsize(p) for p in files), len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cjk-mb", type=float, default=60)
    ap.add_argument("--english-files", type=int, default=16)
    ap.add_argument("--english-copies", type=int, default=6, help="of the Gutenberg passages, spread over the files")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "mpi_skew"))
    args = ap.parse_args()
    bin_dir = os.path.dirname(sys.executable)
    mpirun = shutil.which("mpirun", path=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    if not os.path.isdir(SHARED) or mpirun is None:
        print("skipped: needs ../shared/data and mpirun (pip install 'shardlm[mpi]')")
        return
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        print("skipped: mpi4py is not installed (pip install 'shardlm[mpi]')")
        return
    shutil.rmtree(args.out, ignore_errors=True)
    corpus = os.path.join(args.out, "corpus")
    nbytes, nfiles = write_corpus(corpus, args.cjk_mb, args.english_files, args.english_copies)
    tok = os.path.join(args.out, "tokenizer")
    subprocess.run([sys.executable, "-m", "preprocess", "tokenizer", "--input", corpus, "--vocab-size", "8000",
                    "--character-coverage", "0.98", "--sample-mb", "20", "--out", tok], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"corpus: {nbytes / 1e6:.0f} MB in {nfiles} files (one {args.cjk_mb:.0f} MB .json array of Tang poems, "
          f"{args.english_files} Gutenberg jsonl files); mpirun -n {args.ranks}, --workers 1 per rank; machine: "
          f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}")
    walls: dict[str, list[float]] = {"dynamic": [], "static": []}
    digests = set()
    for _ in range(args.repeat):
        for mode in ("static", "dynamic"):
            out = os.path.join(args.out, f"shards-{mode}")
            shutil.rmtree(out, ignore_errors=True)
            env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                   "SHARDLM_MPI": "0" if mode == "static" else "1"}
            start = time.perf_counter()
            subprocess.run([mpirun, "-n", str(args.ranks), sys.executable, "-m", "preprocess", "shards", "--input",
                            corpus, "--tokenizer", os.path.join(tok, "tokenizer.model"), "--out", out, "--workers",
                            "1", "--unit-mb", "4"], cwd=REPO, env=env, check=True, capture_output=True)
            walls[mode].append(time.perf_counter() - start)
            digests.add(digest(out))
    assert len(digests) == 1, "the static and the dynamic split wrote different bytes"
    static, dynamic = statistics.median(walls["static"]), statistics.median(walls["dynamic"])
    print(f"static split {static:.1f} s, units from rank 0 {dynamic:.1f} s (medians of {args.repeat}) -> "
          f"dynamic/static {dynamic / static:.2f}; the same bytes")


if __name__ == "__main__":
    main()
