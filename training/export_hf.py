"""Export a checkpoint as a Hugging Face transformers Llama model and tokenizer.

    python -m training.export_hf --checkpoint RUN_OR_CKPT_DIR --out DIR [--dtype float32|bfloat16|float16]

DIR gets config.json, generation_config.json, model.safetensors (sharded above 5 GB), tokenizer.json and its
configs (with the chat template), and our tokenizer.model, so DIR is also a valid init_from. Before DIR appears,
the export is loaded back with transformers and its logits and token ids are checked against ours.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR); tokenizer = AutoTokenizer.from_pretrained(DIR)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from preprocess.errors import UserError, exit_code

from . import checkpoint as ckpt
from . import hf
from .model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# texts whose ids the exported tokenizer must reproduce: words, whitespace runs, tabs, CRLF, digits, CJK, emoji
CHECK_TEXTS = ["Before we proceed any further, hear me speak.\n\nAll:\n\tSpeak, speak.",
               "    return a + b  \r\n", "1234 and 3.14", "床前明月光，疑是地上霜。", "café 🚀 — «½»"]


def export(checkpoint: str, out: str, dtype: str = "float32", verify: bool = True) -> dict:
    try:
        import transformers
    except ImportError:
        raise UserError("exporting needs transformers: pip install 'shardlm[hf]'") from None
    from preprocess.tokenizer import load_tokenizer, tokenizer_file

    transformers.utils.logging.disable_progress_bar()
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"{out}: exists and is not empty; choose a new --out")
    source = ckpt.resolve(checkpoint)
    cfg = ckpt.model_config(source)
    model = Transformer(cfg)
    ckpt.load_weights(source, model)  # LoRA adapters, if any, are merged into the weights here
    model.eval()
    sp_path = tokenizer_file(source)
    if sp_path is None:
        raise UserError(f"{source}: has no tokenizer.model or tokenizer.json to export")
    info = load_tokenizer(sp_path)

    config = transformers.LlamaConfig(**hf.to_hf_config(cfg, info.special_ids), dtype=dtype)
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(config)
    state = {k: v.to(DTYPES[dtype]) for k, v in hf.to_hf_state_dict(model.state_dict(), cfg).items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]  # tied: set just below
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hf_model.tie_weights()
    end = [info.special_ids[t] for t in ("<|end|>",) if t in info.special_ids]
    hf_model.generation_config = transformers.GenerationConfig(
        bos_token_id=info.special_ids.get("bos"), eos_token_id=[info.eos_id, *end],
        pad_token_id=info.special_ids.get("pad"),
        # ids past the tokenizer's vocabulary pad the embedding to a round size: never generated (as ours)
        suppress_tokens=list(range(info.vocab_size, cfg.vocab_size)) or None)

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.save_pretrained(tmp, max_shard_size="5GB")
        if info.kind == "hf":  # the run's own tokenizer.json, byte for byte (its sha256 is what shards record)
            hf.hf_json_tokenizer(info).save_pretrained(tmp)
        else:
            hf.hf_tokenizer(sp_path).save_pretrained(tmp)
        shutil.copyfile(sp_path, os.path.join(tmp, os.path.basename(sp_path)))
        report = check(tmp, model, sp_path, DTYPES[dtype]) if verify else {}
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # readable as the user's other files are (some writers create 0600 files)
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"source": source, "step": ckpt.saved_run(source)[1].step if not hf.is_hf_dir(source) else None, **report}


@torch.no_grad()
def check(path: str, model: Transformer, sp_path: str, dtype: torch.dtype) -> dict:
    """Load the export with transformers and compare: logits (fp32 compute) and tokenizer ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preprocess.tokenizer import TextTokenizer

    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = model
    if dtype != torch.float32:  # compare against our weights rounded as the export stores them
        reference = Transformer(model.cfg).eval()
        reference.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    sp = TextTokenizer(sp_path)
    length = min(64, model.cfg.max_seq_len)
    tokens = torch.randint(0, sp.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    ours = reference(tokens)
    diff = float((theirs(tokens).logits - ours).abs().max())
    scale = float(ours.abs().max())
    if not diff <= 1e-4 * max(1.0, scale):
        raise UserError(f"{path}: transformers' logits differ from ours by {diff:.3g} (largest logit {scale:.3g}); "
                        "the export is not kept")
    tokenizer = AutoTokenizer.from_pretrained(path)
    for text in CHECK_TEXTS:
        if tokenizer(text, add_special_tokens=False)["input_ids"] != sp.encode(text):
            raise UserError(f"{path}: transformers' tokenizer encodes {text!r} differently from ours; the export is "
                            "not kept")
    return {"max_logit_diff": diff, "texts_checked": len(CHECK_TEXTS)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="a new directory")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="of the stored weights (default float32)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the export back with transformers")
    args = p.parse_args(argv)

    def run():
        r = export(args.checkpoint, args.out, args.dtype, not args.no_verify)
        size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
        step = f"step {r['step']} of " if r["step"] is not None else ""
        checked = (f"; transformers reproduces our logits (largest difference {r['max_logit_diff']:.1e}) and our token "
                   f"ids on {r['texts_checked']} texts" if "max_logit_diff" in r else "")
        print(f"export_hf: {step}{r['source']} → {args.out} ({size / 1e6:,.1f} MB, {args.dtype}){checked}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
