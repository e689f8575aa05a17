"""A baseline with the structure of Megatron-LM's tools/preprocess_data.py, for bench/preprocessing.py.

The parent reads jsonl lines and maps them through a process pool (imap, 32 lines per task); each worker parses
one line and encodes its one document; the token lists come back to the parent, which alone writes them to a
.bin file and the document sizes to an index. Like Megatron's script it imports torch (its dataset builder
needs it); --no-torch leaves that out, to show what the import alone costs.

    python bench/megatron_style.py --input F.jsonl [...] --tokenizer M --out PREFIX --workers N --docs D [--no-torch]

Prints one JSON line: tokens, documents, and the steady-state rate between 10% and 90% of the documents.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time

import numpy as np

_sp = None


def _init(model: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model, num_threads=1)


def _encode(line: str) -> tuple[list[int], int]:
    text = json.loads(line)["text"]
    return _sp.encode(text) + [_sp.eos_id()], len(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--docs", type=int, required=True, help="documents in the input, for the 10%%/90%% marks")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    if not args.no_torch:
        import torch  # noqa: F401  (Megatron's indexed dataset builder imports it)

    def lines():
        for path in args.input:
            with open(path, encoding="utf-8") as f:
                yield from f

    marks = {int(args.docs * 0.1): None, int(args.docs * 0.9): None}
    tokens = docs = 0
    sizes = []
    with open(args.out + ".bin", "wb") as out, mp.get_context("fork").Pool(args.workers, _init, (args.tokenizer,)) as pool:
        for ids, _ in pool.imap(_encode, lines(), 32):
            out.write(np.asarray(ids, dtype=np.uint16).tobytes())
            sizes.append(len(ids))
            tokens += len(ids)
            docs += 1
            if docs in marks:
                marks[docs] = (time.perf_counter(), tokens)
    np.save(args.out + ".idx.npy", np.asarray(sizes, dtype=np.int32))
    (t10, k10), (t90, k90) = marks.values()
    print(json.dumps({"tokens": tokens, "documents": docs, "steady_tokens_per_sec": (k90 - k10) / (t90 - t10)}))


if __name__ == "__main__":
    sys.exit(main())
