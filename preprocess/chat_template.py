"""A model's own chat template: the jinja2 `chat_template` of its tokenizer_config.json (or a chat_template.jinja
beside it, or a file given with --chat-template), rendered as transformers renders it and tokenized as transformers
tokenizes the rendering, so that a document's ids are `AutoTokenizer.apply_chat_template(messages, tokenize=True)`.

Text a message holds never becomes a control token: the control tokens (the special tokens, and the added tokens
the template writes, such as Qwen3's <think>) are marked in every message before rendering and encoded as plain
text, exactly as transformers' `sanitize_control_tokens=True` does. A conversation without such text gets the
ids of a plain `apply_chat_template`.

The loss mask covers what the assistant writes: its content and the end-of-turn token(s) the template puts after
it, up to the last control token (the whitespace a template writes after it, such as Qwen's newline, is not
learned). It is derived from renderings of the conversation's prefixes: for each learned assistant turn, the
conversation before it with the generation prompt, then through it; the first's ids must begin the second's (a
template whose generation prompt is not how it renders the turn cannot be split, and the record is skipped with a
counted reason). When every such rendering begins the whole conversation's, the conversation is one document with
every learned span; when the template rewrites earlier turns (Qwen3 drops the reasoning of turns before the last
user message), each learned turn becomes a document of its own, with the history as the template renders it
when that turn is the last.
"""

from __future__ import annotations

import functools
import hashlib
import json
import keyword
import os
import re
from datetime import datetime

import numpy as np

from .chat import ChatTemplate, Turn
from .errors import UserError
from .fileio import atomic_write
from .hf_tokenizer import CONFIG, SAVED, find_file, is_textual, load_reference, read_spec
from .readers import Bad
from .tokenizer import TokenizerInfo

TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers save the template, beside tokenizer_config.json
# reserved by the rendering: not options a template can be given
RESERVED = ("messages", "add_generation_prompt", "tools", "documents", "continue_final_message")
MARK_START, MARK_END = "\U000f0000", "\U000f0001"  # around a control token in a message (transformers' markers)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def find_template(tokenizer_path: str, override: str | None = None,
                  saved: bool = True) -> tuple[str, str, dict, str | None] | None:
    """(the template's text, where it came from, the options and the date it was used with) for a tokenizer.json:
    --chat-template's
    file; else (saved) the shardlm_chat_template.json that chat shards wrote beside it (the template and options they were
    written with, which travels with the tokenizer into runs and checkpoints); else a chat_template.jinja beside it;
    else its tokenizer_config.json's chat_template (the default one when it holds several) — the last two in
    transformers' order. None when there is none."""
    if override:
        try:
            with open(override, encoding="utf-8") as f:
                return f.read(), override, {}, None
        except OSError as e:
            raise UserError(f"--chat-template {override}: {e.strerror}") from None
    folder = os.path.dirname(tokenizer_path)
    record_path = os.path.join(folder, SAVED)
    if saved and os.path.isfile(record_path):
        try:
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
            return record["template"], record_path, record["kwargs"], record.get("date")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{record_path}: unreadable ({e!r})") from None
    jinja = os.path.join(folder, TEMPLATE_FILE)
    if os.path.isfile(jinja):  # transformers prefers it to tokenizer_config.json's
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja, {}, None
    template = read_config(tokenizer_path).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if isinstance(template, str) and template:
        return template, os.path.join(folder, CONFIG), {}, None
    return None


JINJA_WORDS = {"true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if", "else"}


def jinja_literal(value) -> str:
    """A JSON value (an option) as a jinja2 literal that evaluates to the same Python value."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(jinja_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{jinja_literal(k)}: {jinja_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)  # int, float


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_config(tokenizer_path: str) -> dict:
    path = os.path.join(os.path.dirname(tokenizer_path), CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def compile_template(source: str, where: str, today: str | None = None):
    """The template compiled in the sandbox transformers uses, with its globals (raise_exception, strftime_now),
    its tojson, loop controls and the {% generation %} tag (whose body is rendered as is). today (an ISO date):
    what strftime_now tells the template (default: now, as transformers)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("a model's chat template needs jinja2 (pip install jinja2)") from None

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: (datetime.fromisoformat(today) if today else datetime.now()).strftime(fmt)
    try:
        return env.from_string(source), env
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"{where}: the chat template does not compile (line {e.lineno}: {e.message})") from None


def literal_text(env, source: str) -> str:
    """The template's own text and string constants, joined so that no match spans two of them."""
    import jinja2

    ast = env.parse(source)
    literals = [n.data for n in ast.find_all(jinja2.nodes.TemplateData)]
    literals += [n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)]
    return "\0".join(literals)


class ModelTemplate:
    """The chat template of a tokenizer.json's model: documents (ids, mask) of conversations, and the prompt ids
    that ask for the next assistant turn."""

    def __init__(self, tokenizer_path: str, source: str, where: str, options: dict, today: str | None = None):
        from tokenizers import Tokenizer  # the tokenizer.json's library (load_reference checked it is installed)

        self.path = find_file(tokenizer_path)
        self.plain = load_reference(self.path)  # no added token from text
        self.full = Tokenizer.from_file(self.path)
        self.source, self.where, self.options = source, where, dict(options)
        # a template that writes today's date (Llama 3.2's system header) writes the one the shards were made on
        self.today = today if uses_date(source) else None
        self.sha256 = hashlib.sha256(self.source.encode()).hexdigest()
        self.compiled, env = compile_template(self.source, self.where, self.today)
        config = read_config(self.path)
        self.variables = {name: value.get("content") if isinstance(value, dict) else value
                          for name in SPECIAL_NAMES if (value := config.get(name)) is not None}
        added = read_spec(self.path).get("added_tokens", [])
        literals = literal_text(env, self.source)
        self.control = [t["content"] for t in added if t.get("special") or
                        (t["content"] in literals and not is_textual(t))]
        longest_first = "|".join(map(re.escape, sorted(self.control, key=len, reverse=True))) or "(?!)"
        self.control_re = re.compile(longest_first)
        every_added = "|".join(map(re.escape, sorted((t["content"] for t in added), key=len, reverse=True))) or "(?!)"
        self.markers_re = re.compile(f"{MARK_START}({every_added}){MARK_END}|[{MARK_START}{MARK_END}]")
        self.control_ids = {self.full.token_to_id(t) for t in self.control}
        self.newline = self.full.encode("\n", add_special_tokens=False).ids
        self._end_ids: list[int] | None = None
        if reserved := sorted(set(self.options) & set(RESERVED)):
            raise UserError(f"--chat-template-kwargs: {reserved[0]!r} is set by the rendering itself, not an option")
        if bad := next((k for k in self.options if not k.isidentifier() or keyword.iskeyword(k) or k in JINJA_WORDS
                        or k in SPECIAL_NAMES), None):
            raise UserError(f"--chat-template-kwargs: {bad!r} cannot be a template option (a name a template can set: "
                            "letters, digits and _, not a keyword or a special token's name)")
        probe, reply = [{"role": "user", "content": "Hi"}], "Zq9reply"
        try:
            prompt = self.render(probe, True)
            ignores = prompt == self.render(probe, False)
            through = self.render([*probe, {"role": "assistant", "content": reply}], False)
        except Exception as e:
            raise UserError(f"{self.where}: the chat template fails on a two-turn conversation ({first_line(e)})") \
                from None
        # a template without a generation prompt (Mistral's, Llama 2's) is fine when the reply follows the prompt
        # directly; one that puts a header between them it does not render for the prompt is not
        if ignores and not (through.startswith(prompt) and through[len(prompt):].lstrip().startswith(reply)):
            raise UserError(f"{self.where}: the chat template's add_generation_prompt does not render what comes before "
                            "the assistant's reply, so the reply cannot be told from its header; give one that does "
                            "(--chat-template FILE)")

    def identity(self) -> dict:
        """What the shards' plan and manifest record of the template."""
        return {"chat_template_sha256": self.sha256, "chat_template_kwargs": self.options,
                **({"chat_template_date": self.today} if self.today else {})}

    def with_options(self) -> str:
        """The template with its options as defaults, for transformers (an export): each unless the caller sets it."""
        settings = "".join(f"{{%- if {k} is not defined %}}{{%- set {k} = {jinja_literal(v)} %}}{{%- endif %}}\n"
                           for k, v in self.options.items())
        return settings + self.source

    def save(self, folder: str) -> str:
        """shardlm_chat_template.json in `folder` (beside a copy of the tokenizer): the template and options, so that runs
        and checkpoints render prompts as the shards were rendered."""
        path = os.path.join(folder, SAVED)
        record = {"template": self.source, "kwargs": self.options, "sha256": self.sha256,
                  **({"date": self.today} if self.today else {})}
        atomic_write(path, json.dumps(record, ensure_ascii=False, indent=1).encode())
        return path

    # ------------------------------------------------------------------------------------- rendering
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for messages whose control tokens are marked (see mark)."""
        return self.compiled.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **{**self.variables, **self.options})

    def mark(self, text: str) -> str:
        text = text.replace(MARK_START, "").replace(MARK_END, "")
        return self.control_re.sub(f"{MARK_START}\\g<0>{MARK_END}", text)

    def encode(self, chat: str) -> list[int]:
        """A rendering's ids: the template's control tokens as tokens, marked ones (from messages) as text, each
        piece between markers encoded on its own (as transformers' sanitized encoding does)."""
        pieces = self.markers_re.split(chat)
        ids = self.full.encode(pieces[0], add_special_tokens=False).ids
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:  # a lone marker (a template's split() separated it from its token): dropped
                continue
            encode = self.plain.encode if i % 2 == 1 else self.full.encode
            # after a newline, as transformers does, so that a tokenizer adding a prefix space at the start of a
            # string does not add one inside the chat
            piece_ids = encode("\n" + piece, add_special_tokens=False).ids
            ids += piece_ids[len(self.newline):] if piece_ids[:len(self.newline)] == self.newline else \
                encode(piece, add_special_tokens=False).ids
        return ids

    def ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt))

    # ------------------------------------------------------------------------------------- documents
    def messages(self, turns) -> list[dict]:
        """The turns as transformers passes them to a template: reasoning (marked too) under reasoning_content and
        its alias thinking."""
        return [{"role": t.role, "content": self.mark(t.text)} if not t.reasoning else
                {"thinking": self.mark(t.reasoning), "role": t.role, "content": self.mark(t.text),
                 "reasoning_content": self.mark(t.reasoning)} for t in turns]

    def learned_end(self, ids: list[int], start: int) -> int:
        """Where an assistant turn's learned tokens end in `ids` (its rendering through the turn): after its last
        control token when whitespace alone follows it, else at the end."""
        end = len(ids)
        while end > start and ids[end - 1] not in self.control_ids and \
                self.full.decode([ids[end - 1]], skip_special_tokens=False).isspace():
            end -= 1
        return end if end > start and ids[end - 1] in self.control_ids else len(ids)

    def conversation(self, turns, learn: str, eos_id: int) -> list[tuple[np.ndarray, np.ndarray]] | Bad:
        """The documents of one conversation: one with every learned turn, or one per learned turn when the
        template rewrites earlier turns. learn="assistant": every assistant turn; "last": the final one."""
        messages = self.messages(turns)
        learned = [i for i, t in enumerate(turns) if t.role == "assistant" and (learn == "assistant" or i == len(turns) - 1)]
        try:  # the renderings first: a failure of the template on this record is a counted skip
            texts = [self.render(messages, False)]
            for k in learned:
                texts += [self.render(messages[:k], True)] + ([] if k == len(turns) - 1 else
                                                              [self.render(messages[:k + 1], False)])
        except Exception as e:  # raise_exception's TemplateError, or a template's own TypeError on this record
            return Bad("template_error", first_line(e))
        rendered = iter(texts)
        whole = self.encode(next(rendered))
        spans = []
        for k in learned:
            prompt = self.encode(next(rendered))
            through = whole if k == len(turns) - 1 else self.encode(next(rendered))
            if through[:len(prompt)] != prompt:
                return Bad("template_split", f"turn {k}: the template's generation prompt is not how its rendering "
                           "of the assistant's turn begins")
            spans.append((len(prompt), self.learned_end(through, len(prompt)), through))
        if all(whole[:len(through)] == through for _, _, through in spans):
            pieces = [(whole, [(start, end) for start, end, _ in spans])]
        else:
            pieces = [(through, [(start, end)]) for start, end, through in spans]
        documents = []
        for ids, learned_spans in pieces:
            mask = np.zeros(len(ids) + (ids[-1:] != [eos_id]), dtype=np.uint8)
            for start, end in learned_spans:
                mask[start:end] = 1
            documents.append((np.array(ids + [eos_id] * (ids[-1:] != [eos_id]), dtype=np.int64), mask))
        return documents

    def documents(self, encoder, conversations, learn: str, eos_id: int) -> list:
        return [self.conversation(turns, learn, eos_id) for turns in conversations]

    # ------------------------------------------------------------------------------------- generation
    def prompt_ids(self, turns, encode=None) -> list[int]:
        """ids that ask the model for the next assistant turn (the template encodes its text itself)."""
        try:
            return self.ids(self.messages(turns), add_generation_prompt=True)
        except Exception as e:  # the template refuses these turns
            raise UserError(f"{self.where}: the chat template refused the prompt ({first_line(e)})") from None

    def end_ids(self) -> list[int]:
        """The ids that end an assistant's turn (a reply stops at any of them): the control tokens the template
        writes right after a reply's text."""
        if self._end_ids is None:
            turns = [Turn("user", "Hi"), Turn("assistant", "Hello")]
            prompt = self.prompt_ids(turns[:1])
            try:
                through = self.ids(self.messages(turns))
            except Exception as e:
                raise UserError(f"{self.where}: the chat template fails on a two-turn conversation ({first_line(e)})") \
                    from None
            end = self.learned_end(through, len(prompt))
            start = end
            while start > len(prompt) and through[start - 1] in self.control_ids:
                start -= 1
            self._end_ids = list(dict.fromkeys(through[start:end]))
        return self._end_ids


def uses_date(source: str) -> bool:
    return "strftime_now" in source


def template_for(tokenizer: TokenizerInfo, override: str | None = None, options: dict | None = None,
                 today: str | None = None):
    """The chat template of conversations tokenized with this tokenizer: a tokenizer.json's model's (find_template;
    `options` replace the ones it was saved with, `today` its date), else ours on the tokenizer's reserved role
    symbols."""
    found = find_template(tokenizer.path, override) if tokenizer.kind == "hf" else None
    if found is not None:
        source, where, saved, saved_day = found
        return cached_template(tokenizer.path, source, where, json.dumps(saved if options is None else options,
                                                                         sort_keys=True), today or saved_day)
    if override or options is not None:
        what = "--chat-template" if override else "--chat-template-kwargs"
        raise UserError(f"{what}: {tokenizer.path} is not a tokenizer.json with a chat template; a chat template is a "
                        "Hugging Face tokenizer's (a sentencepiece model's conversations use shardlm's own template)")
    return ChatTemplate(tokenizer)


@functools.lru_cache(maxsize=8)
def cached_template(path: str, source: str, where: str, options: str, today: str | None) -> ModelTemplate:
    """One compiled template per tokenizer, template, options and date in a process (a sampler asks for every
    prompt)."""
    return ModelTemplate(path, source, where, json.loads(options), today)


def previous_date(template, out_dir: str) -> str | None:
    """The date an earlier (interrupted or finished) run of the same template into out_dir rendered with."""
    try:
        with open(os.path.join(out_dir, SAVED), encoding="utf-8") as f:
            record = json.load(f)
        return record["date"] if record.get("sha256") == template.sha256 and record.get("date") else None
    except (OSError, ValueError, AttributeError, KeyError):
        return None
