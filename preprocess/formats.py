"""Records → documents, one class per shard kind. A record that cannot be used becomes a Bad.

A kind parses each record on its own (cheap, per record), then builds a batch of parsed records into token ids
with one batched encoder call. Accepted record shapes:

pretrain  a string, or {"<text-key>": string}
sft       {"messages" | "conversations": [{"role", "content"}, ...]}   (also ShareGPT's {"from", "value"})
          {"instruction", "input"?, "output"}                           (alpaca)
          {"prompt", "response" | "completion"}
dpo       {"prompt"?, "chosen", "rejected"}: strings, or message lists (the prompt's turns come first; without
          a prompt, chosen and rejected are whole conversations ending with the compared assistant turns)
          {"instruction", "input"?, "chosen", "rejected"}               (alpaca with preferences)
kto       {"prompt", "completion", "label": bool}, any sft form with "label", or a dpo pair
prompts   {"prompt": string | message list, ...} or {"messages": message list, ...}: a string is continued as
          plain text, messages get the chat template's prompt for an assistant reply; every other field of the
          record (an answer, test cases) is kept beside the prompt for the rewards (training.grpo)
"""

from __future__ import annotations

import json

import numpy as np

from .chat import REASONING_KEYS, ChatTemplate, Turn
from .errors import UserError
from .readers import Bad, SegmentReader

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "model": "assistant"}


def parsed_records(kind, segments, txt_doc: str):
    """(segment index, position, parsed record or Bad, where) of every record of `segments`, in order; where()
    names the file and line (computed only when called). The writing pass, the dedup signatures and the encoder
    check all walk records through this one function, so that they number documents alike."""
    for si, seg in enumerate(segments):
        reader = SegmentReader(seg, columns=kind.columns, txt_doc=txt_doc)
        for pos, record in reader:
            yield si, pos, kind.parse(record), (lambda reader=reader, pos=pos: reader.where(pos))


# --------------------------------------------------------------------------------------------- pretrain

def pretrain_text(record: object, text_key: str) -> str | Bad:
    """A pretraining document: a bare string, or the `text_key` field of an object."""
    if isinstance(record, Bad):
        return record
    if isinstance(record, dict):
        if text_key not in record:
            return Bad("missing_key", repr(text_key))
        record = record[text_key]
        if not isinstance(record, str):
            return Bad("not_a_string", f"{text_key!r} is {type(record).__name__}")
    elif not isinstance(record, str):
        return Bad("not_an_object", type(record).__name__)
    return check_text(record)


def check_text(text: str, allow_empty: bool = False) -> str | Bad:
    if not allow_empty and (not text or text.isspace()):
        return Bad("empty")
    if "\x00" in text:
        return Bad("binary", "NUL bytes")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from a JSON "\ud800" escape
            return Bad("invalid_utf8", f"lone surrogate at character {e.start}")
    return text


# ------------------------------------------------------------------------------------------ conversations

def messages_to_turns(value: object, key: str) -> list[Turn] | Bad:
    if not isinstance(value, list) or not value:
        return Bad("bad_messages", f"{key!r} is not a non-empty list")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return Bad("bad_messages", f"{key}[{i}] is not an object")
        if extra := next((f for f in ("tool_calls", "images", "image", "audio", "video") if message.get(f)), None):
            return Bad("unsupported", f"{key}[{i}] has {extra!r}: text turns only")
        role, text = message.get("role", message.get("from")), message.get("content", message.get("value"))
        if role not in ROLE_ALIASES:
            return Bad("bad_role", f"{key}[{i}] has role {role!r}")
        if not isinstance(text, str):
            return Bad("not_a_string", f"{key}[{i}] content is {type(text).__name__}")
        reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), "")
        if not isinstance(reasoning, str):
            return Bad("not_a_string", f"{key}[{i}] reasoning is {type(reasoning).__name__}")
        turns.append(Turn(ROLE_ALIASES[role], text, reasoning))
    return turns


def _string(record: dict, key: str) -> str | Bad:
    value = record[key]
    return value if isinstance(value, str) else Bad("not_a_string", f"{key!r} is {type(value).__name__}")


def _instruction(record: dict) -> str | Bad:
    """Alpaca: the instruction, then the input (when there is one) after a blank line."""
    instruction = _string(record, "instruction")
    extra = _string(record, "input") if "input" in record else ""
    for part in (instruction, extra):
        if isinstance(part, Bad):
            return part
    return instruction + ("\n\n" + extra if extra.strip() else "")


def _completion_turns(record: dict, key: str, prompt: list[Turn]) -> list[Turn] | Bad:
    value = record[key]
    if isinstance(value, str):
        return [*prompt, Turn("assistant", value)]
    turns = messages_to_turns(value, key)
    return turns if isinstance(turns, Bad) else [*prompt, *turns]


def _check_conversation(turns: list[Turn], last_is_assistant: bool) -> list[Turn] | Bad:
    assistant = [t for t in turns if t.role == "assistant"]
    if not assistant or (last_is_assistant and turns[-1].role != "assistant"):
        return Bad("no_assistant")
    for t in turns:
        checked = check_text(t.text + t.reasoning, allow_empty=t.role != "assistant")
        if isinstance(checked, Bad):
            return checked
    return turns


def sft_turns(record: object) -> list[Turn] | Bad:
    if isinstance(record, Bad):
        return record
    if not isinstance(record, dict):
        return Bad("not_an_object", type(record).__name__)
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        turns = messages_to_turns(record[key], key)
    elif "instruction" in record and "output" in record:
        prompt, output = _instruction(record), _string(record, "output")
        turns = next((x for x in (prompt, output) if isinstance(x, Bad)), None) or [
            Turn("user", prompt), Turn("assistant", output)]
    elif "prompt" in record and ("response" in record or "completion" in record):
        answer = "response" if "response" in record else "completion"
        prompt, output = _string(record, "prompt"), _string(record, answer)
        turns = next((x for x in (prompt, output) if isinstance(x, Bad)), None) or [
            Turn("user", prompt), Turn("assistant", output)]
    else:
        return Bad("missing_key", "need messages, conversations, instruction+output or prompt+response")
    if isinstance(turns, Bad):
        return turns
    if isinstance(record.get("system"), str) and turns[0].role != "system":
        turns = [Turn("system", record["system"]), *turns]
    return _check_conversation(turns, last_is_assistant=False)


def dpo_pair(record: object) -> tuple[list[Turn], list[Turn]] | Bad:
    """(chosen conversation, rejected conversation), each ending with the assistant turn being compared."""
    if isinstance(record, Bad):
        return record
    if not isinstance(record, dict):
        return Bad("not_an_object", type(record).__name__)
    if "chosen" not in record or "rejected" not in record:
        return Bad("missing_key", "need 'chosen' and 'rejected'")
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [Turn("user", prompt)] if isinstance(prompt, str) else messages_to_turns(prompt, "prompt")
    elif "instruction" in record:
        text = _instruction(record)
        prompt = text if isinstance(text, Bad) else [Turn("user", text)]
    elif isinstance(record["chosen"], list):
        prompt = []  # whole conversations
    else:
        return Bad("missing_key", "string 'chosen'/'rejected' need a 'prompt' or an 'instruction'")
    if isinstance(prompt, Bad):
        return prompt
    pair = []
    for key in ("chosen", "rejected"):
        turns = _completion_turns(record, key, prompt)
        if isinstance(turns, Bad):
            return turns
        turns = _check_conversation(turns, last_is_assistant=True)
        if isinstance(turns, Bad):
            return turns
        pair.append(turns)
    if pair[0] == pair[1]:
        return Bad("identical_pair")
    return pair[0], pair[1]


def kto_examples(record: object) -> list[tuple[list[Turn], bool]] | Bad:
    """Labelled completions: (conversation ending with the completion, desirable?) — one from a record with a
    boolean "label" (prompt+completion, or any SFT form), two from a preference pair (chosen: true, rejected:
    false)."""
    if isinstance(record, Bad):
        return record
    if not isinstance(record, dict):
        return Bad("not_an_object", type(record).__name__)
    if "chosen" in record and "rejected" in record:
        if "label" in record:  # which completion would it label?
            return Bad("bad_label", "a preference pair is labelled by itself (chosen: true, rejected: false); "
                       "drop 'label', or drop 'chosen' and 'rejected' and give 'completion'")
        pair = dpo_pair(record)
        return pair if isinstance(pair, Bad) else [(pair[0], True), (pair[1], False)]
    if "label" not in record:
        return Bad("missing_key", "need a boolean 'label' (or 'chosen' and 'rejected')")
    if not isinstance(record["label"], bool):
        return Bad("bad_label", f"'label' is {type(record['label']).__name__}, not true or false")
    turns = sft_turns(record)
    if not isinstance(turns, Bad) and turns[-1].role != "assistant":
        return Bad("no_assistant", "the last turn must be the assistant's completion")
    return turns if isinstance(turns, Bad) else [(turns, record["label"])]


# ----------------------------------------------------------------------------------------------- kinds

class PretrainKind:
    """One document per record: its text, then eos. No mask: every token is a target."""
    name, has_mask, has_fields = "pretrain", False, False

    def __init__(self, encoder, text_key: str, max_len: int, template: ChatTemplate | None = None):
        self.encoder, self.text_key = encoder, text_key

    @property
    def columns(self) -> list[str] | None:
        return [self.text_key]

    def parse(self, record):
        return pretrain_text(record, self.text_key)

    def size(self, parsed: str) -> int:
        return len(parsed)

    def texts(self, parsed: str) -> list[str]:
        """What the encoder sees of a parsed record."""
        return [parsed]

    def dedup_text(self, parsed: str) -> str:
        """What two records must share to be duplicates."""
        return parsed

    def build(self, batch: list) -> tuple[np.ndarray, None, np.ndarray, list[tuple[int, Bad]]]:
        ids, lengths = self.encoder.encode(batch)
        return ids, None, lengths, []


class _ChatKind:
    has_mask, has_fields, columns = True, False, None

    def __init__(self, encoder, text_key: str, max_len: int, template: ChatTemplate):
        self.encoder, self.max_len, self.template = encoder, max_len, template

    def _documents(self, conversations: list[list[Turn]], learn: str) -> list:
        """Per conversation, its documents [(ids, mask), ...] (several when the template rewrites earlier turns: see
        preprocess/chat_template.py), or a Bad."""
        return self.template.documents(self.encoder, conversations, learn, self.encoder.eos)

    def _too_long(self, docs) -> Bad | None:
        longest = max(len(ids) for ids, _ in docs)
        return Bad("too_long", f"{longest} tokens > --max-len {self.max_len}") if longest > self.max_len else None

    def _pack(self, docs: list[tuple[np.ndarray, np.ndarray]]):
        if not docs:
            return np.empty(0, self.encoder.dtype), np.empty(0, np.uint8), np.empty(0, np.int64)
        ids = np.concatenate([d[0] for d in docs]).astype(self.encoder.dtype)
        mask = np.concatenate([d[1] for d in docs])
        return ids, mask, np.array([len(d[0]) for d in docs], dtype=np.int64)


class SFTKind(_ChatKind):
    """One document per conversation; the mask covers every assistant turn and its end-of-turn token.
    Conversations longer than max_len tokens are dropped (counted as too_long), never truncated."""
    name = "sft"

    def parse(self, record):
        return sft_turns(record)

    def size(self, parsed: list[Turn]) -> int:
        return sum(len(t.whole) for t in parsed)

    def texts(self, parsed: list[Turn]) -> list[str]:
        return [t.text for t in parsed]

    def dedup_text(self, parsed: list[Turn]) -> str:
        # without system turns: a long system prompt shared by a whole dataset would make every pair look alike
        return "\x1f".join(t.whole for t in parsed if t.role != "system")

    def build(self, batch: list[list[Turn]]):
        kept, bad = [], []
        for i, docs in enumerate(self._documents(batch, learn="assistant")):
            problem = docs if isinstance(docs, Bad) else self._too_long(docs)
            if problem:
                bad.append((i, problem))
            else:
                kept += docs
        return *self._pack(kept), bad


class DPOKind(_ChatKind):
    """Two consecutive documents per pair, chosen then rejected, sharing their prompt; each mask covers only the
    final assistant turn. A pair with either side longer than max_len tokens is dropped (too_long)."""
    name = "dpo"

    def parse(self, record):
        return dpo_pair(record)

    def size(self, parsed) -> int:
        return sum(len(t.whole) for conv in parsed for t in conv)

    def texts(self, parsed) -> list[str]:
        return [t.text for conv in parsed for t in conv]

    def dedup_text(self, parsed) -> str:
        chosen, rejected = parsed  # the shared prompt once, then both completions; no system turns
        return "\x1f".join([*(t.whole for t in chosen if t.role != "system"), rejected[-1].whole])

    def build(self, batch: list[tuple[list[Turn], list[Turn]]]):
        docs = self._documents([conv for pair in batch for conv in pair], learn="last")
        kept, bad = [], []
        for i in range(len(batch)):
            chosen, rejected = docs[2 * i], docs[2 * i + 1]
            problem = next((d for d in (chosen, rejected) if isinstance(d, Bad)), None) or \
                self._too_long(chosen + rejected)
            if problem:
                bad.append((i, problem))
            else:
                kept += chosen + rejected
        return *self._pack(kept), bad


class KTOKind(_ChatKind):
    """One document per labelled completion, its mask on the final assistant turn (and its <|end|>) only: 1 for a
    desirable completion, 2 for an undesirable one. A preference pair gives two documents, chosen (1) then
    rejected (2). A record with any document longer than max_len tokens is dropped (too_long)."""
    name = "kto"
    LABELS = {True: 1, False: 2}  # the mask value of a learned token

    def parse(self, record):
        return kto_examples(record)

    def size(self, parsed) -> int:
        return sum(len(t.whole) for conv, _ in parsed for t in conv)

    def texts(self, parsed) -> list[str]:
        return [t.text for conv, _ in parsed for t in conv]

    def dedup_text(self, parsed) -> str:
        return "\x1e".join("\x1f".join(t.whole for t in conv if t.role != "system") + f"\x1f{label}"
                            for conv, label in parsed)

    def build(self, batch):
        docs = iter(self._documents([conv for examples in batch for conv, _ in examples], learn="last"))
        kept, bad = [], []
        for i, examples in enumerate(batch):
            rendered = [(example, next(docs)) for example in examples]
            problem = next((d for _, d in rendered if isinstance(d, Bad)), None)
            rendered = [] if problem else [(ids, mask * self.LABELS[label]) for (_, label), d in rendered
                                           for ids, mask in d]
            problem = problem or self._too_long(rendered)
            if problem:
                bad.append((i, problem))
            else:
                kept += rendered
        return *self._pack(kept), bad


RESERVED_FIELDS = ("completion_tokens", "stopped")  # what GRPO tells a reward about each completion


def prompt_record(record: object) -> tuple[str | list[Turn], dict] | Bad:
    """(the prompt: a string, or the conversation so far as turns; the record as kept for the rewards: its prompt as
    given and every other field)."""
    if isinstance(record, Bad):
        return record
    if not isinstance(record, dict):
        return Bad("not_an_object", type(record).__name__)
    key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    if key is None:
        return Bad("missing_key", "need 'prompt' (a string or a message list) or 'messages'")
    value = record[key]
    if isinstance(value, str):
        prompt = check_text(value)
    else:
        prompt = messages_to_turns(value, key)
        if not isinstance(prompt, Bad) and prompt[-1].role == "assistant":
            prompt = Bad("bad_messages", f"the last of {key!r} is the assistant's; a prompt ends before the reply")
        for turn in prompt if not isinstance(prompt, Bad) else []:
            if isinstance(checked := check_text(turn.text + turn.reasoning, allow_empty=True), Bad):
                prompt = checked
                break
    if isinstance(prompt, Bad):
        return prompt
    if reserved := next((k for k in RESERVED_FIELDS if k in record), None):
        return Bad("unsupported", f"field {reserved!r}: GRPO gives the rewards its own value of that name")
    try:
        json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError) as e:  # a Parquet column of another type (dates, bytes)
        return Bad("unsupported", f"a field is not JSON ({e})")
    return prompt, {k: v for k, v in record.items() if k != key} | {"prompt": value}


class PromptsKind(_ChatKind):
    """One document per prompt, the ids that ask for a completion then eos (no mask: nothing is learned from the
    prompt); a message list is rendered with the chat template, a string is plain text. Each document's record
    (its prompt as given, every other field, and where it was read) is kept in the shard's `fields` file. A prompt
    longer than max_len tokens is dropped (too_long)."""
    name, has_mask, has_fields = "prompts", False, True

    def parse(self, record):
        return prompt_record(record)

    def size(self, parsed) -> int:
        prompt, _ = parsed
        return len(prompt) if isinstance(prompt, str) else sum(len(t.whole) for t in prompt)

    def texts(self, parsed) -> list[str]:
        prompt, _ = parsed
        return [prompt] if isinstance(prompt, str) else [t.text for t in prompt]

    def dedup_text(self, parsed) -> str:
        """The prompt and every other field: one prompt with two answers is two records."""
        prompt, record = parsed
        text = prompt if isinstance(prompt, str) else "\x1f".join(t.whole for t in prompt if t.role != "system")
        others = {k: v for k, v in record.items() if k != "prompt"}
        return text + ("\x1e" + json.dumps(others, sort_keys=True, ensure_ascii=False) if others else "")

    def prompt_ids(self, batch) -> list[np.ndarray | Bad]:
        """Each prompt's ids; the texts of plain prompts and of shardlm's own template's turns in one encoder call
        (a model's template renders and encodes each conversation itself)."""
        own = isinstance(self.template, ChatTemplate)  # else a model's, or none (message lists refused)
        texts = [t for prompt, _ in batch for t in ([prompt] if isinstance(prompt, str) else
                                                    [turn.text for turn in prompt] if own else [])]
        encoded = iter(self.encoder.encode_each(texts))
        out = []
        for prompt, _ in batch:
            if isinstance(prompt, str):
                out.append(next(encoded))
            elif own:
                out.append(np.array(self.template.prompt(prompt, [next(encoded) for _ in prompt])))
            else:
                try:
                    out.append(np.array(self.template.prompt_ids(prompt)))
                except UserError as e:
                    out.append(Bad("template_error", str(e)))
        return out

    def build(self, batch):
        docs, bad = [], []
        for i, ids in enumerate(self.prompt_ids(batch)):
            problem = ids if isinstance(ids, Bad) else None
            if problem is None and len(ids) + 1 > self.max_len:
                problem = Bad("too_long", f"{len(ids) + 1} tokens > --max-len {self.max_len}")
            if problem:
                bad.append((i, problem))
            else:
                docs.append((np.append(ids, self.encoder.eos).astype(np.int64), None))
        ids = np.concatenate([d for d, _ in docs]).astype(self.encoder.dtype) if docs else \
            np.empty(0, self.encoder.dtype)
        return ids, None, np.array([len(d) for d, _ in docs], dtype=np.int64), bad

    @staticmethod
    def fields(batch, bad: list, places: list) -> list[bytes]:
        """The kept records of a batch (those build() did not refuse), each as one line of JSON."""
        refused = {i for i, _ in bad}
        return [(json.dumps({"record": record, "where": where()}, ensure_ascii=False) + "\n").encode()
                for i, ((_, record), where) in enumerate(zip(batch, places, strict=True)) if i not in refused]


KINDS = {"pretrain": PretrainKind, "sft": SFTKind, "dpo": DPOKind, "kto": KTOKind, "prompts": PromptsKind}
