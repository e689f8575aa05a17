"""The chat template: conversations → token ids and a loss mask, built from the tokenizer's reserved control
symbols, so that no text can forge a role marker.

    <|system|> text <|end|>  <|user|> text <|end|>  <|assistant|> text <|end|>  ...  </s>

Each turn's text is encoded on its own and placed between ids that only this template can produce. The mask
is 1 on the tokens the model learns to write — an assistant turn's text and its <|end|> — and 0 elsewhere
(role markers, user and system text, the final </s>). Generation starts from the ids of the conversation so far
followed by <|assistant|>, and stops at <|end|>.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .readers import Bad
from .tokenizer import END_OF_TURN, ROLE_TOKENS, TokenizerInfo

TEMPLATE = "shardlm-chat-v1"
ROLES = tuple(ROLE_TOKENS)  # system, user, assistant


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # a message's reasoning, as transformers reads it


@dataclass(frozen=True)
class Turn:
    role: str
    text: str
    reasoning: str = ""  # an assistant's reasoning before its reply (Qwen3's reasoning_content): a model's template

    @property
    def whole(self) -> str:
        """Everything the turn says (what two records must share to be duplicates)."""
        return f"{self.reasoning}\x1d{self.text}" if self.reasoning else self.text


class ChatTemplate:
    def __init__(self, tokenizer: TokenizerInfo):
        missing = [t for t in (*ROLE_TOKENS.values(), END_OF_TURN) if t not in tokenizer.special_ids]
        if missing and tokenizer.kind == "hf":
            raise UserError(f"{tokenizer.path}: has no chat template (no chat_template in its tokenizer_config.json, "
                            "no chat_template.jinja beside it) and not shardlm's chat control symbols; give the "
                            "model's template with --chat-template FILE")
        if missing:
            raise UserError(f"{tokenizer.path}: the tokenizer lacks the chat control symbols {', '.join(missing)}; "
                            "train one with `python -m preprocess tokenizer` (it reserves them)")
        self.role_ids = {role: tokenizer.special_ids[tok] for role, tok in ROLE_TOKENS.items()}
        self.end_id = tokenizer.special_ids[END_OF_TURN]
        self.eos_id = tokenizer.eos_id

    def identity(self) -> dict:
        """What the shards' plan and manifest record of the template."""
        return {"template": TEMPLATE}

    def documents(self, encoder, conversations: list[list[Turn]], learn: str, eos_id: int) -> list:
        """Per conversation, its one document (ids, mask), or a Bad; the texts encoded in one batched call."""
        encoded = iter(encoder.encode_each([t.text for conv in conversations for t in conv]))
        out = []
        for conv in conversations:
            texts = [next(encoded) for _ in conv]
            if any(t.reasoning for t in conv):
                out.append(Bad("unsupported", "reasoning_content: shardlm's own template has no place for it (a "
                               "tokenizer.json with its model's chat template has)"))
            else:
                out.append([self.render(conv, texts, learn)])
        return out

    def prompt_ids(self, turns: list[Turn], encode) -> list[int]:
        return self.prompt(turns, [np.array(encode(t.text)) for t in turns])

    def end_ids(self) -> list[int]:
        return [self.end_id]

    def render(self, turns: list[Turn], texts: list[np.ndarray], learn: str) -> tuple[np.ndarray, np.ndarray]:
        """ids and mask of a whole conversation; texts[i] are the ids of turns[i].text.

        learn="assistant": every assistant turn is learned (SFT); "last": only the final turn (DPO completions)."""
        ids, mask = [], []
        last = len(turns) - 1
        for i, (turn, text) in enumerate(zip(turns, texts, strict=True)):
            learned = turn.role == "assistant" and (learn == "assistant" or i == last)
            ids += [self.role_ids[turn.role], *text.tolist(), self.end_id]
            mask += [0] + [int(learned)] * (len(text) + 1)
        ids.append(self.eos_id)
        mask.append(0)
        return np.array(ids, dtype=np.int64), np.array(mask, dtype=np.uint8)

    def prompt(self, turns: list[Turn], texts: list[np.ndarray]) -> list[int]:
        """ids that ask the model for the next assistant turn."""
        ids = []
        for turn, text in zip(turns, texts, strict=True):
            ids += [self.role_ids[turn.role], *text.tolist(), self.end_id]
        return ids + [self.role_ids["assistant"]]
