"""Export a checkpoint as a Hugging Face transformers model and tokenizer: of the family its weights came from
(Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 3, Mixtral, Qwen2-MoE), or for a model trained from scratch the
first family that computes it (Llama; Mixtral or Qwen2-MoE for model.moe).

    python -m training.export_hf --checkpoint RUN_OR_CKPT_DIR --out DIR [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]

DIR gets config.json, generation_config.json, model.safetensors (sharded above --max-shard-size, as transformers'
save_pretrained shards, with model.safetensors.index.json), tokenizer.json and its
configs (with the chat template), and our tokenizer.model, so DIR is also a valid init_from. Before DIR appears,
the export is loaded back with transformers and its logits and token ids are checked against ours.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR); tokenizer = AutoTokenizer.from_pretrained(DIR)

A LoRA run's adapters alone, as a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) for
the export of its base model (the run's init_from, exported as above):

    python -m training.export_hf --checkpoint LORA_RUN --adapter-only --base BASE_EXPORT --out DIR
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_EXPORT), DIR)

Before DIR appears, the base is checked to hold the run's frozen weights, and the adapted model loaded through
peft is checked to give our merged model's logits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import torch

from preprocess.chat import Turn
from preprocess.chat_template import SAVED, TEMPLATE_FILE, ModelTemplate, find_template, template_for
from preprocess.errors import UserError, exit_code
from preprocess.tokenizer import TextTokenizer, load_tokenizer, tokenizer_file, tokenizer_files

from .checkpoint.state import saved_run
from .checkpoint.store import load_file as load_checkpoint_file
from .checkpoint.weights import loaded_model, model_config, model_file, resolve
from .config import config_from_yaml
from .models import hf, lora
from .models.decoding import reply_end_ids
from .models.tokenizer_export import hf_json_tokenizer, hf_tokenizer
from .models.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", **{name: name for name in DTYPES}}
# texts whose ids the exported tokenizer must reproduce: words, whitespace runs, tabs, CRLF, digits, CJK, emoji
CHECK_TEXTS = ["Before we proceed any further, hear me speak.\n\nAll:\n\tSpeak, speak.",
               "    return a + b  \r\n", "1234 and 3.14", "床前明月光，疑是地上霜。", "café 🚀 — «½»"]


def start_export(checkpoint: str, out: str, needs: str = "hf"):
    """(transformers, the resolved checkpoint) for an export into `out`, which must be new or empty."""
    try:  # optional: the hf (and lora) extras
        import transformers
        if needs != "hf":
            import peft  # noqa: F401
    except ImportError:
        raise UserError(f"exporting needs {'transformers' if needs == 'hf' else 'transformers and peft'}: "
                        f"pip install 'shardlm[{needs}]'") from None
    transformers.utils.logging.disable_progress_bar()
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"{out}: exists and is not empty; choose a new --out")
    return transformers, resolve(checkpoint)


def export(checkpoint: str, out: str, dtype: str = "float32", verify: bool = True, max_shard_size: str = "5GB") -> dict:
    dtype = DTYPE_NAMES[dtype]  # bf16 or bfloat16
    transformers, source = start_export(checkpoint, out)
    cfg = model_config(source)
    family = hf.family_of(cfg)
    model = loaded_model(source, cfg)  # LoRA adapters, if any, are merged into the weights here
    model.eval()
    sp_path = tokenizer_file(source)
    if sp_path is None:
        raise UserError(f"{source}: has no tokenizer.model or tokenizer.json to export")
    info = load_tokenizer(sp_path)

    model_class = getattr(transformers, family.architecture)
    config = model_class.config_class(**family.to_hf_config(cfg, info.special_ids), dtype=dtype)
    with torch.device("meta"):
        hf_model = model_class(config)
    state = {k: v.to(DTYPES[dtype]) for k, v in family.to_hf_state_dict(model.state_dict(), cfg).items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]  # tied: set just below
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hf_model.tie_weights()
    template = chat_template_of(info)
    end = reply_end_ids(info, template) if template else [info.eos_id]  # eos first: every end of a reply
    hf_model.generation_config = transformers.GenerationConfig(
        bos_token_id=info.special_ids.get("bos"), eos_token_id=[info.eos_id, *(i for i in end if i != info.eos_id)],
        pad_token_id=info.special_ids.get("pad"),
        # ids past the tokenizer's vocabulary pad the embedding to a round size: never generated (as ours)
        suppress_tokens=list(range(info.vocab_size, cfg.vocab_size)) or None)

    def write(tmp: str) -> dict:
        hf_model.save_pretrained(tmp, max_shard_size=max_shard_size)
        companions = tokenizer_files(sp_path)
        if info.kind == "hf" and len(companions) > 1:  # a model's tokenizer: its files byte for byte
            for path in companions:
                if os.path.basename(path) != SAVED:  # ours: transformers reads the template from the next file
                    shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
            if isinstance(template, ModelTemplate) and (template.options or
                                                        template.source != configured_template(sp_path)):
                with open(os.path.join(tmp, TEMPLATE_FILE), "w", encoding="utf-8") as f:
                    # the shards' own (--chat-template) with their options as defaults: transformers prefers this file
                    f.write(template.with_options())
        elif info.kind == "hf":  # a bare tokenizer.json, byte for byte (its sha256 is what shards record)
            hf_json_tokenizer(info).save_pretrained(tmp)
        else:
            hf_tokenizer(sp_path).save_pretrained(tmp)
        shutil.copyfile(sp_path, os.path.join(tmp, os.path.basename(sp_path)))
        return check(tmp, model, sp_path, DTYPES[dtype]) if verify else {}

    report = publish(out, write)
    return {"source": source, "step": saved_run(source)[1].step if not hf.is_hf_dir(source) else None, **report}


def chat_template_of(info):
    """The chat template of the run's tokenizer (its model's, or ours), or None when it has none or only one its
    shards did not use (a pretraining run with an instruct model's tokenizer) that cannot render turns."""
    found = find_template(info.path) if info.kind == "hf" else None
    try:
        template = template_for(info)
        template.end_ids()
        return template
    except UserError:
        if found is not None and found[1].endswith(SAVED):  # the shards were written in it: the user's to see
            raise
        return None  # a tokenizer without chat symbols or template: plain text only


def configured_template(tokenizer_path: str) -> str | None:
    """The template transformers reads from the tokenizer's own files."""
    found = find_template(tokenizer_path, saved=False)
    return found[0] if found else None


def publish(out: str, write) -> dict:
    """write(tmp) fills and checks a temporary directory beside `out`, which then becomes `out` (empty or
    absent, checked before): an export that fails its check never appears."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        report = write(tmp)
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
    return report


@torch.no_grad()
def export_adapter(checkpoint: str, out: str, base: str) -> dict:
    """A LoRA checkpoint's adapters as a PEFT adapter directory for the transformers model in `base`."""
    transformers, source = start_export(checkpoint, out, needs="hf,lora")
    from peft import LoraConfig, PeftModel, get_peft_model  # optional: the lora extra, checked just above

    if hf.is_hf_dir(source):
        raise UserError(f"--adapter-only: {source} is a transformers directory; give the LoRA run or checkpoint")
    run_cfg = config_from_yaml(os.path.join(source, "config.yaml"))
    state = load_checkpoint_file(model_file(source))
    if not lora.is_adapted_state(state):
        raise UserError(f"--adapter-only: {source} has no LoRA adapters (trained with lora.rank=0)")
    if not hf.is_hf_dir(base):
        raise UserError(f"--base {base}: not a transformers model directory (export the run's init_from with "
                        "python -m training.export_hf first)")
    cfg = run_cfg.model
    hf.family_of(cfg)  # a model no transformers family computes is refused here, by its settings
    base_state = {k.replace(".base_layer.", "."): v for k, v in state.items() if lora.ADAPTER_KEY not in k
                  and ".lora_B." not in k}
    # the frozen weights the adapters sit on, as stored (a bf16 base the run started from upcasts to them exactly;
    # a bf16 rounding of other fp32 weights does not)
    stored = loaded_model(base, cfg).state_dict()
    for name, tensor in base_state.items():
        if not torch.allclose(stored[name], tensor.float(), rtol=1e-6, atol=1e-7):
            rounded = "" if hf.stored_dtypes(base) == {"F32"} else \
                " (stored in less than float32: export it in float32, the default)"
            raise UserError(f"--base {base}: {name} differs from the weights {source} trained its adapters on"
                            f"{rounded}; give the export of that run's init_from")
    del stored
    moe = any(cfg.is_moe(i) for i in range(cfg.n_layers))
    if moe and any(".feed_forward." in key and ".lora_A." in key for key in state):
        raise UserError("--adapter-only: PEFT reads gate_proj, up_proj and down_proj of a mixture-of-experts model as "
                        "its experts, so adapters on a dense block's w1, w2, w3 cannot be written as a PEFT adapter; "
                        "export the merged model instead (without --adapter-only)")
    names = hf.tensor_names(cfg)
    adapters = {}
    for key, value in state.items():  # layers.{i}.attention.wq.lora_A.default.weight → peft's name of the same
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module, kind = key.split(".lora_")
        if f"{module}.weight" not in names:  # the output head tied to the embedding: no module of its own there
            raise UserError(f"--adapter-only: adapters on {module} have no transformers module to sit on (the head "
                            "is tied to the embedding); export the merged model instead (without --adapter-only)")
        theirs, heads = names[f"{module}.weight"]
        if kind.startswith("B."):  # B's rows are the projection's rows: they follow its rotary layout
            value = hf.rope_layout(value, heads, to_hf=True)
        adapters[f"base_model.model.{theirs.removesuffix('.weight')}.lora_{kind}"] = value
    # the adapted modules' own names (q_proj, …): an MoE model's feed-forward adapters are refused above, so none
    # of these reaches an expert
    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters})
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(hf_model, LoraConfig(r=run_cfg.lora.rank, lora_alpha=run_cfg.lora.alpha,
                                                     lora_dropout=run_cfg.lora.dropout, target_modules=targets))
    missing = [k for k, _ in peft_model.named_parameters() if ".lora_" in k and k not in adapters]
    unexpected = [k for k in adapters if k not in dict(peft_model.named_parameters())]
    if missing or unexpected:
        raise RuntimeError(f"adapter mapping incomplete (missing {missing[:3]}, unexpected {unexpected[:3]})")
    peft_model.load_state_dict(adapters, strict=False)

    def write(tmp: str) -> dict:
        peft_model.save_pretrained(tmp)
        config_path = os.path.join(tmp, "adapter_config.json")
        with open(config_path) as f:
            adapter_config = json.load(f)
        adapter_config["base_model_name_or_path"] = os.path.abspath(base)
        with open(config_path, "w") as f:
            json.dump(adapter_config, f, indent=2)
        # the check: a fresh base with the saved adapter, through peft, against our merged model
        merged = loaded_model(source, cfg)
        loaded = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           tmp).eval()
        tokens = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
        ours = merged.eval()(tokens)
        diff = float((loaded(input_ids=tokens).logits - ours).abs().max())
        if not diff <= 1e-4 * max(1.0, float(ours.abs().max())):
            raise UserError(f"{out}: peft's adapted model differs from ours by {diff:.3g}; the export is not kept")
        return {"max_logit_diff": diff}

    report = publish(out, write)
    return {"source": source, "step": saved_run(source)[1].step, "adapters": len(adapters) // 2, **report}


@torch.no_grad()
def check(path: str, model: Transformer, sp_path: str, dtype: torch.dtype) -> dict:
    """Load the export with transformers and compare: logits (fp32 compute) and tokenizer ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # optional: checked by start_export

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
    check_template(path, tokenizer, chat_template_of(sp.info))
    return {"max_logit_diff": diff, "texts_checked": len(CHECK_TEXTS)}


def check_template(path: str, tokenizer, template) -> None:
    """transformers renders a conversation from the export's files as the shards' template does: with a system turn,
    or without one for a template that refuses it. A date the template writes is today's on both sides (the
    export's template writes the day it runs, as transformers does)."""
    if not isinstance(template, ModelTemplate):
        return
    ours = ModelTemplate(template.path, template.source, template.where, template.options)  # the date: now
    conversation = [Turn("system", "Be brief."), Turn("user", "Name a colour."), Turn("assistant", "Blue.")]
    for turns in (conversation, conversation[1:]):
        try:
            expected = ours.ids(ours.messages(turns))
        except Exception:  # a template that refuses system turns (Mistral's): the next conversation
            continue
        try:
            theirs = tokenizer.apply_chat_template([{"role": t.role, "content": t.text} for t in turns],
                                                   tokenize=True, return_dict=False)
        except Exception as e:
            raise UserError(f"{path}: transformers cannot render a conversation with the exported chat template "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); the export is not kept") \
                from None
        if theirs != expected:
            raise UserError(f"{path}: transformers renders a conversation differently from the chat template the "
                            "run's shards were written in; the export is not kept")
        return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="a new directory")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="float32",
                   help="of the stored weights (default float32; bf16 = bfloat16)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="files of at most this size, as transformers' save_pretrained (default 5GB)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the export back with transformers")
    p.add_argument("--adapter-only", action="store_true", help="a LoRA run's adapters as a PEFT adapter directory")
    p.add_argument("--base", help="with --adapter-only: the transformers export of the run's base (its init_from)")
    args = p.parse_args(argv)
    args.dtype = DTYPE_NAMES[args.dtype]  # the name it prints
    if not re.fullmatch(r"\d+([KMG]B|[KMG]iB)", args.max_shard_size):  # what transformers reads, bytes not bits
        p.error(f"--max-shard-size {args.max_shard_size!r}: a whole number and KB, MB, GB, KiB, MiB or GiB (5GB)")
    if args.adapter_only and not args.base:
        p.error("--adapter-only needs --base (the export of the LoRA run's init_from)")
    if args.adapter_only and (args.dtype != "float32" or args.no_verify):
        p.error("--adapter-only writes the adapters in float32 and always checks them; drop --dtype and --no-verify")
    if args.base and not args.adapter_only:
        p.error("--base is for --adapter-only")

    def run_adapter():
        r = export_adapter(args.checkpoint, args.out, args.base)
        print(f"export_hf: the {r['adapters']} adapters of step {r['step']} of {r['source']} → {args.out} (PEFT, "
              f"for {args.base}); peft reproduces our merged model's logits (largest difference "
              f"{r['max_logit_diff']:.1e})")

    if args.adapter_only:
        return exit_code(run_adapter)

    def run():
        r = export(args.checkpoint, args.out, args.dtype, not args.no_verify, args.max_shard_size)
        size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
        step = f"step {r['step']} of " if r["step"] is not None else ""
        checked = (f"; transformers reproduces our logits (largest difference {r['max_logit_diff']:.1e}) and our token "
                   f"ids on {r['texts_checked']} texts" if "max_logit_diff" in r else "")
        print(f"export_hf: {step}{r['source']} → {args.out} ({size / 1e6:,.1f} MB, {args.dtype}){checked}")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
