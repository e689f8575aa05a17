"""A run's tokenizer as a transformers fast tokenizer (training.export_hf): a sentencepiece BPE model rebuilt as
tokenizers' BPE with the same ids, or a run's own tokenizer.json; the chat template of preprocess/chat.py for
apply_chat_template.

transformers and tokenizers are optional (the hf extra), imported where a tokenizer is built.
"""

from __future__ import annotations

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from preprocess.errors import UserError
from preprocess.tokenizer import CONTROL_SYMBOLS, load_tokenizer

# the chat template of preprocess/chat.py for transformers' apply_chat_template: each turn between its role
# marker and <|end|>, nothing in between; the generation prompt is <|assistant|>
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def bpe_merges(sp) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and the merge list of a sentencepiece BPE model: every way of writing a piece as two pieces,
    ranked by the merged piece's id (sentencepiece merges by piece score, which falls with the id)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    mergeable = {p: i for p, i in vocab.items()
                 if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for piece, _ in sorted(mergeable.items(), key=lambda item: item[1]):
        splits = [(mergeable[piece[:k]], mergeable[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in mergeable and piece[k:] in mergeable]
        merges += [(left, right) for *_, left, right in sorted(splits)]
    return vocab, merges


def sentencepiece_spec(sp_path: str) -> dict:
    """What decides how a sentencepiece BPE model splits text, read from its protobuf; what a transformers
    tokenizer cannot reproduce exactly is refused by name."""
    proto = pb.ModelProto()
    with open(sp_path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    unsupported = {  # key: (its value, whether it is unsupported)
        "model_type": (pb.TrainerSpec.ModelType.Name(trainer.model_type), trainer.model_type != pb.TrainerSpec.BPE),
        "normalization_rule_name": (normalizer.name, normalizer.name not in ("identity", "")
                                    or bool(normalizer.precompiled_charsmap)),
        "remove_extra_whitespaces": (True, normalizer.remove_extra_whitespaces),
        "treat_whitespace_as_suffix": (True, trainer.treat_whitespace_as_suffix),
    }
    for key, (value, bad) in unsupported.items():
        if bad:
            raise UserError(f"{sp_path}: sentencepiece {key}={value!r} cannot be exported as a transformers tokenizer "
                            "(BPE with identity normalisation only)")
    return {"dummy_prefix": normalizer.add_dummy_prefix, "whitespace_only_pieces": trainer.allow_whitespace_only_pieces,
            "split_by_whitespace": trainer.split_by_whitespace, "byte_fallback": trainer.byte_fallback}


def hf_tokenizer(sp_path: str):
    """A transformers fast tokenizer that gives the ids of a sentencepiece BPE model with identity normalisation
    (ours, or e.g. Llama 2's), with the chat template and its role markers as special tokens when it has them."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers  # optional: the hf extra
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    info = load_tokenizer(sp_path)
    spec = sentencepiece_spec(sp_path)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    vocab, merges = bpe_merges(sp)
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=spec["byte_fallback"]))
    # As sentencepiece: spaces become "▁" (and one is put in front when the model adds a dummy prefix); then the
    # text is cut into words, each starting at a "▁" — a run of them stays together when whitespace-only pieces
    # are allowed — and merges never cross a word.
    replace = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *replace] if spec["dummy_prefix"] else replace)
    if spec["split_by_whitespace"]:
        words = "▁*[^▁]+|▁+" if spec["whitespace_only_pieces"] else "▁[^▁]*|[^▁]+"
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(words), behavior="isolated")
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*decode, decoders.Strip(" ", 1, 0)] if spec["dummy_prefix"] else decode)
    chat = [t for t in CONTROL_SYMBOLS if t in info.special_ids]
    names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token"}
    special = {names[k]: sp.id_to_piece(v) for k, v in info.special_ids.items() if k in names}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special, additional_special_tokens=chat,
                                   chat_template=CHAT_TEMPLATE if len(chat) == 4 else None,
                                   clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def hf_json_tokenizer(info):
    """A transformers fast tokenizer on a run's own tokenizer.json, with its eos (and bos) named."""
    from tokenizers import Tokenizer  # optional: the hf extra
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(info.path)
    names = {key: tok.id_to_token(info.special_ids[key]) for key in ("eos", "bos") if key in info.special_ids}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in names.items()})
