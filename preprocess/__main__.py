"""python -m preprocess {tokenizer,shards,verify,show,export,import} — see README.md for the tour."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from . import dedup, importing, megatron
from .chat_template import ModelTemplate
from .encoders import ENCODERS, Encoder, choose_encoder
from .errors import UserError, exit_code
from .formats import pretrain_text
from .group import job_group
from .hf_tokenizer import markers_as_text, read_spec
from .parallel import MiB, auto_unit_bytes, build_shards, make_plan
from .readers import REASONS, TXT_DOC_MODES, Bad, SegmentReader, expand_inputs, plan_segments
from .shards import KINDS, ShardJob, begun_date, encoder_sample, eos_ends_documents, read_manifest, shard_array, verify, verify_shard
from .tokenizer import load_tokenizer, sample_documents, train_tokenizer


def json_object(text: str) -> dict:
    """--chat-template-kwargs: a JSON object."""
    def finite_only(name):
        raise ValueError(f"{name} is not a value a template option can hold")

    try:
        value = json.loads(text, parse_constant=finite_only)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m preprocess", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add_input_options(sp):
        sp.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                        help="files, directories or globs: .jsonl .jsonl.gz .json .txt .txt.gz .md .parquet")
        sp.add_argument("--text-key", default="text", help="field holding the text in jsonl/json/parquet (default: text)")
        sp.add_argument("--txt-doc", choices=TXT_DOC_MODES, default="file",
                        help="a .txt file is one document (file, default) or one document per non-blank line (line)")

    t = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer")
    add_input_options(t)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--sample-mb", type=float, default=100.0,
                   help="train on at most this much text, sampled in blocks across the inputs (default: 100)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of the text's characters that get pieces of their own; the rarest rest is written as "
                        "UTF-8 bytes (default: 0.9995; e.g. 0.98 for a few-thousand-piece Chinese vocabulary)")

    s = sub.add_parser("shards", help="tokenize corpora into memory-mapped token shards")
    add_input_options(s)
    s.add_argument("--kind", choices=KINDS, default="pretrain")
    s.add_argument("--tokenizer", required=True, metavar="FILE",
                   help="a sentencepiece .model file, or a Hugging Face tokenizer.json (BPE) or a directory "
                        "holding one")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--workers", type=int, default=default_workers(), help="worker processes (default: all cores)")
    s.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    s.add_argument("--rank", type=int, default=None,
                   help="this process's share of the units when several split one job (default: from srun or a "
                        "Slurm array; under mpirun with mpi4py, rank 0 hands units out instead; 0 alone)")
    s.add_argument("--world", type=int, default=None, help="how many processes split the job (see --rank)")
    s.add_argument("--chat-template", metavar="FILE", default=None,
                   help="sft/dpo/kto with a tokenizer.json: a jinja2 chat template used instead of the one in its "
                        "tokenizer_config.json")
    s.add_argument("--chat-template-kwargs", metavar="JSON", type=json_object, default=None,
                   help="options the chat template reads, e.g. '{\"enable_thinking\": false}' (Qwen3)")
    s.add_argument("--max-len", type=int, default=2048,
                   help="sft/dpo: drop (and count) examples longer than this many tokens (default: 2048)")
    s.add_argument("--encoder", choices=ENCODERS, default="auto",
                   help="what computes the ids: gigatoken when installed and it gives the reference's ids on a "
                        "sample of this job's input (auto, default), or always the reference (sentencepiece for a "
                        ".model, tokenizers for a tokenizer.json); the shards are the same bytes either way")
    s.add_argument("--dedup", choices=dedup.MODES, default="none",
                   help="drop repeated documents: exact (the same text) or near (MinHash similarity, also exact); "
                        "the first of each group in input order is kept (default: none)")
    s.add_argument("--dedup-threshold", type=float, default=0.8,
                   help="near: estimated Jaccard similarity of two documents' shingles that makes them duplicates "
                        "(default: 0.8)")
    s.add_argument("--dedup-shingles", choices=dedup.SHINGLES, default="words",
                   help="near: compare word n-grams (default) or character n-grams (for text without spaces)")
    s.add_argument("--dedup-ngram", type=int, default=5, help="near: n of the n-grams (default: 5)")
    s.add_argument("--unit-mb", type=float, default=None,
                   help="input per work unit and shard (default: corpus/512, within 4–256 MiB)")

    v = sub.add_parser("verify", help="re-hash every shard and check ids, offsets and eos")
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--workers", type=int, default=default_workers())

    x = sub.add_parser("export", help="write pretraining shards in another trainer's format (Megatron's)")
    x.add_argument("dir", metavar="DIR")
    x.add_argument("--format", choices=["megatron"], required=True,
                   help="megatron: PREFIX.bin and PREFIX.idx, an indexed dataset Megatron-LM and Megatron-Core read")
    x.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")

    i = sub.add_parser("import", help="read another trainer's token files (Megatron, nanoGPT) as pretraining shards, "
                       "linked, not copied")
    i.add_argument("input", metavar="IN", help="megatron: PREFIX of PREFIX.bin and PREFIX.idx; nanogpt: a .bin file of "
                   "uint16 ids (train.bin)")
    i.add_argument("--format", choices=importing.FORMATS, required=True)
    i.add_argument("--tokenizer", required=True, metavar="FILE",
                   help="the tokenizer the ids were made with: a sentencepiece model or a tokenizer.json")
    i.add_argument("--out", required=True, metavar="DIR")
    i.add_argument("--eot", type=int, default=None,
                   help="nanogpt: the id after which each document ends (default: the tokenizer's eos)")
    i.add_argument("--workers", type=int, default=default_workers(), help="processes hashing the token file")
    i.add_argument("--trust-tokenizer", action="store_true",
                   help="import even when a sample of documents decoded and encoded again does not give back its ids")

    w = sub.add_parser("show", help="print one document of a shard directory as ids and as text")
    w.add_argument("dir", metavar="DIR")
    w.add_argument("--doc", type=int, default=0, help="document index over the whole directory (default: 0)")
    w.add_argument("--max-tokens", type=int, default=48, help="how many tokens to print (default: 48)")
    return p.parse_args(argv)


def iter_documents(segments, text_key: str, txt_doc: str, skipped: dict):
    """Usable document texts from segments; bad records are counted in `skipped`."""
    for seg in segments:
        for _, record in SegmentReader(seg, columns=[text_key], txt_doc=txt_doc):
            text = pretrain_text(record, text_key)
            if isinstance(text, Bad):
                skipped[text.reason] = skipped.get(text.reason, 0) + 1
            else:
                yield text


def cmd_tokenizer(args) -> None:
    if args.vocab_size < 1:
        raise UserError(f"--vocab-size must be positive, got {args.vocab_size}")
    paths = expand_inputs(args.input)
    segments = plan_segments(paths, 4 * MiB, args.txt_doc)
    total = sum(s.size for s in segments)
    skipped: dict[str, int] = {}
    docs = sample_documents(segments, lambda seg: iter_documents([seg], args.text_key, args.txt_doc, skipped),
                            int(args.sample_mb * MiB), args.seed)
    report = train_tokenizer(docs, args.out, args.vocab_size, character_coverage=args.character_coverage)
    share = f"{100 * report.bytes_trained / total:.0f}% of" if total else "of"
    documents = f"{report.documents:,} document{'s' * (report.documents != 1)}"
    print(f"tokenizer: BPE, {report.vocab_size:,} tokens; trained on {report.bytes_trained / 1e6:,.1f} MB "
          f"({documents} in {report.chunks:,} chunks; {share} {total / 1e6:,.1f} MB of input) "
          f"in {report.seconds:.1f} s → {os.path.join(args.out, 'tokenizer.model')}")
    if skipped:
        print(f"  skipped records: {_counts(skipped)}")
    if report.skipped_by_trainer:
        print(f"warning: sentencepiece skipped {report.skipped_by_trainer} over-long chunks; see tokenizer.log",
              file=sys.stderr)


def cmd_shards(args) -> None:
    group = job_group(args.rank, args.world)
    try:
        manifest, stats = _run_shards(args, group)
    except BaseException as e:
        if not group.dynamic:
            raise
        # the other ranks would wait for this one forever: say why once, then end them all
        what = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        print(f"error (rank {group.rank}): {what}", file=sys.stderr, flush=True)
        time.sleep(1.0)  # mpirun forwards each rank's output on its own time; an abort at once can drop this line
        group.abort(1)
        os._exit(1)  # MPICH's MPI_Abort can return in the calling process
    if manifest is not None and "rank" in manifest:  # MPI: rank 0 prints the job's summary
        return
    if manifest is None:
        print(f"shards (rank {group.rank} of {group.world}): {stats['new_documents']:,} documents, "
              f"{stats['new_tokens']:,} tokens in {stats['seconds']:.1f} s; {stats['units_left']} units of other "
              f"ranks unfinished — the last rank to finish writes the manifest")
        return
    print_summary(manifest, stats, args.out)
    if manifest["totals"]["documents"] == 0:
        skipped = manifest["skipped"]
        common = max(skipped, key=skipped.get) if skipped else None
        raise UserError("no documents were written: " + (f"all {sum(skipped.values()):,} records were skipped, e.g. "
                        f"{manifest['skipped_examples'][common][0]}" if common else "the inputs hold no records"))


def _run_shards(args, group):
    """Check, plan, choose the encoder (rank 0 chooses for every MPI rank), write: (manifest, stats)."""
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    tokenizer = load_tokenizer(args.tokenizer)
    paths = expand_inputs(args.input, exclude=args.out)
    total = sum(os.path.getsize(p) for p in paths)
    unit_bytes = int(args.unit_mb * MiB) if args.unit_mb else auto_unit_bytes(total)
    if unit_bytes < 1:
        raise UserError(f"--unit-mb must be positive, got {args.unit_mb}")
    segments = plan_segments(paths, unit_bytes, args.txt_doc)
    job = ShardJob(args.out, args.kind, tokenizer, args.text_key, args.txt_doc, args.strict, args.max_len,
                   dedup=dedup.Dedup(args.dedup, args.dedup_threshold, args.dedup_shingles, args.dedup_ngram),
                   chat_template=args.chat_template, chat_template_kwargs=args.chat_template_kwargs)
    template = job.template()  # a chat kind's template exists and compiles (or ours has its symbols): fail early
    if job.dedup.on and group.launcher == "Slurm array":  # its tasks need not run at the same time
        raise UserError("--dedup needs every rank of the job at once: run it under srun or mpirun, not as a Slurm "
                        "array")
    if isinstance(template, ModelTemplate) and args.encoder not in ("auto", "tokenizers"):
        raise UserError(f"--encoder {args.encoder}: shards in a model's chat template are encoded by tokenizers")
    if isinstance(template, ModelTemplate) and (day := group.share(begun_date(job) if group.rank == 0 else None)
                                                if group.dynamic else begun_date(job)):
        job.chat_template_date = day  # the date a template that writes today's date renders every document with
        template = job.template()
    plan = make_plan(job, paths, segments, unit_bytes)
    sample = lambda: encoder_sample(job, segments)  # noqa: E731
    if isinstance(template, ModelTemplate):  # it encodes whole renderings with the tokenizer.json's own library
        job.encoder, note = "tokenizers", None
    elif group.dynamic:
        job.encoder, note = group.share(choose_encoder(args.encoder, tokenizer, sample) if group.rank == 0 else None)
    else:
        job.encoder, note = choose_encoder(args.encoder, tokenizer, sample)
    if note and group.rank == 0:
        print(note, file=sys.stderr)
    if tokenizer.kind == "hf" and (markers := markers_as_text(read_spec(tokenizer.path))) and group.rank == 0:
        print(f"note: {len(markers)} added tokens of {tokenizer.path} that are not special ({', '.join(markers[:3])}"
              f"{', ...' if len(markers) > 3 else ''}) are written as the bytes of text that spells them, where the "
              "model's tokenizer would give their ids: text never makes a token that marks something "
              "(docs/preprocessing.md)")
    Encoder(tokenizer, job.encoder)  # every rank can run the chosen encoder (gigatoken may be missing on one)
    os.makedirs(args.out, exist_ok=True)
    manifest, stats = build_shards(job, plan, args.workers, group=group)
    stats["encoder"] = "its chat template, tokenizers" if isinstance(template, ModelTemplate) else job.encoder
    return manifest, stats


def print_summary(manifest: dict, stats: dict, out: str) -> None:
    t = manifest["totals"]
    if stats.get("already_complete"):
        print(f"shards: {out} is already complete ({t['documents']:,} documents, {t['tokens']:,} tokens); nothing to do")
        return
    rate = f"{stats['new_tokens'] / stats['seconds'] / 1e6:.2f} M tokens/s" if stats["seconds"] > 0 else "0 tokens/s"
    resumed = f" ({stats['resumed_units']} done before)" if stats["resumed_units"] else ""
    print(f"shards: {t['documents']:,} documents, {t['tokens']:,} tokens ({manifest['dtype']}) in {t['shards']:,} shards"
          f"{resumed}; skipped {t['skipped']:,}{' (' + _counts(manifest['skipped']) + ')' if t['skipped'] else ''}; "
          f"{rate} ({stats['encoder']}{', ' + str(stats['ranks']) + ' MPI ranks' if 'ranks' in stats else ''}), "
          f"{stats['seconds']:.1f} s → {out}")
    for examples in manifest["skipped_examples"].values():
        print(f"  {examples[0]}")
    if stats.get("reencoded"):
        where = stats["reencoded"]
        print(f"note: gigatoken's ids differed at the start of {len(where)} units (first: {where[0]}); those units were "
              "written by the reference encoder", file=sys.stderr)
    if "duplicates" in manifest:
        counts = ", ".join(f"{k} {v:,}" for k, v in manifest["duplicates"].items())
        print(f"  duplicates dropped: {counts}" + "".join(f"\n  {e[0]}" for e in manifest["duplicate_examples"].values()))


def cmd_verify(args) -> None:
    manifest, problems = verify(args.dir, args.workers)
    if problems:
        for p in problems:
            print(f"{args.dir}: {p}", file=sys.stderr)
        raise UserError(f"{args.dir}: {len(problems)} problem(s) found")
    t = manifest["totals"]
    ends = "offsets and eos consistent" if eos_ends_documents(manifest) else \
        "offsets consistent (imported documents without eos at their end)"
    print(f"verify: {t['shards']:,} shards, {t['documents']:,} documents, {t['tokens']:,} tokens: all sha256 match, "
          f"ids < {manifest['tokenizer']['vocab_size']}, {ends}")


def cmd_show(args) -> None:

    from .tokenizer import TextTokenizer

    manifest = read_manifest(args.dir)
    index = args.doc
    for shard in manifest["shards"]:
        if index < shard["documents"]:
            break
        index -= shard["documents"]
    else:
        raise UserError(f"{args.dir}: --doc {args.doc} is out of range ({manifest['totals']['documents']} documents)")
    tokens, offsets = (shard_array(args.dir, shard["files"][key]) for key in ("tokens", "offsets"))
    start = int(offsets[index - 1]) if index else 0
    end = min(int(offsets[index]), start + args.max_tokens)
    ids = tokens[start:end].tolist()
    tok = TextTokenizer(os.path.join(args.dir, manifest["tokenizer"]["file"]))
    print(f"document {args.doc} ({shard['name']} #{index}): {int(offsets[index]) - start:,} tokens; the first {len(ids)}:")
    print(f"  ids:    {ids}")
    print(f"  pieces: {[tok.piece(i) for i in ids]}")
    print(f"  text:   {decode_showing_controls(tok, ids)!r}")
    if "mask" in shard["files"]:
        mask = shard_array(args.dir, shard["files"]["mask"])[start:end].tolist()
        print(f"  mask:   {mask}")
        learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        label = {1: ", desirable", 2: ", undesirable"}.get(max(mask, default=0), "") if manifest["kind"] == "kto" else ""
        print(f"  learned (mask {max(mask, default=1) or 1}{label}): {learned!r}")
    if "fields" in shard["files"]:
        ends, fields = (shard_array(args.dir, shard["files"][key]) for key in ("field_ends", "fields"))
        line = bytes(fields[int(ends[index - 1]) if index else 0:int(ends[index])]).decode()
        print(f"  record: {line.strip()}")


def decode_showing_controls(tok, ids: list[int]) -> str:
    """Decoded text with control symbols (<|user|>, </s>, ...) written out instead of dropped."""
    out, run = [], []
    for i in ids + [None]:
        if i is None or tok.is_control(i):
            out.append(tok.decode(run))
            run = []
            if i is not None:
                out.append(tok.piece(i))
        else:
            run.append(i)
    return "".join(out)


def cmd_export(args) -> None:
    """Each document (its eos included, as Megatron's --append-eod writes it) as one sequence of PREFIX.bin, shard by
    shard, every shard verified first (sha256, offsets, ids, eos): nothing damaged is passed on."""
    manifest = read_manifest(args.dir)
    if manifest["kind"] != "pretrain":
        raise UserError(f"{args.dir}: holds {manifest['kind']} shards; a Megatron dataset keeps no loss mask or "
                        "record, so only pretrain shards are exported")
    tok = manifest["tokenizer"]
    dtype = np.dtype(manifest["dtype"])
    out_dtype = np.uint16 if dtype == np.uint16 else np.int32  # Megatron has no uint32: ids stay below 2**31

    if not manifest["totals"]["documents"]:
        raise UserError(f"{args.dir}: holds no document; an empty Megatron dataset cannot be memory-mapped")

    def pieces():  # a shard at a time: its tokens, and its documents' lengths
        for shard in manifest["shards"]:
            if problems := verify_shard(args.dir, shard, manifest):
                raise UserError(f"{args.dir}: {problems[0]}; nothing was exported")
            tokens, offsets = (shard_array(args.dir, shard["files"][key]) for key in ("tokens", "offsets"))
            yield tokens, np.diff(offsets, prepend=0)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    bin_path, idx_path = megatron.write(args.out, pieces(), out_dtype)
    t = manifest["totals"]
    ends = f"each document with its eos, id {tok['special_ids']['eos']}" if eos_ends_documents(manifest) else \
        "documents as imported, some without eos"
    print(f"export: {t['documents']:,} documents, {t['tokens']:,} tokens ({np.dtype(out_dtype)}) → {bin_path}, "
          f"{idx_path} (Megatron indexed dataset; {ends})")


def cmd_import(args) -> None:
    start = time.perf_counter()
    manifest, done = importing.import_corpus(args.format, args.input, load_tokenizer(args.tokenizer), args.out,
                                             eot=args.eot, workers=args.workers, trust_tokenizer=args.trust_tokenizer)
    t, imported = manifest["totals"], manifest["imported"]
    if done:
        print(f"import: {args.out} already holds {args.input} ({t['documents']:,} documents); nothing to do")
        return
    check = imported["tokenizer_round_trip"]
    print(f"import: {t['documents']:,} documents, {t['tokens']:,} tokens ({manifest['dtype']}) in {t['shards']:,} "
          f"shards, {imported['link']} link to {manifest['shards'][0]['sources'][0]['path']}, not copied; ids < "
          f"{manifest['tokenizer']['vocab_size']:,}; decoded and encoded again, the tokenizer gave back "
          f"{100 * check['given_back'] / max(1, check['ids']):.1f}% of {check['ids']:,} sampled ids; "
          f"{time.perf_counter() - start:.1f} s → {args.out}")
    if t["skipped"]:
        print(f"  skipped {t['skipped']:,} empty documents ({manifest['skipped_examples']['empty'][0]})")
    if not imported["eos_ends_documents"]:
        print(f"  {imported['documents_without_eos']:,} documents do not end with eos "
              f"({manifest['tokenizer']['special_ids']['eos']}): the model will not learn to stop after them")


def _counts(counts: dict) -> str:
    return ", ".join(f"{REASONS.get(k, k)}: {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    args = parse_args(argv)
    command = {"tokenizer": cmd_tokenizer, "shards": cmd_shards, "verify": cmd_verify, "show": cmd_show,
               "export": cmd_export, "import": cmd_import}[args.command]
    try:
        return exit_code(lambda: command(args))
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
