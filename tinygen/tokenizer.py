"""Tokenizers: `tokenizer.json` through `tokenizers`, or `tokenizer.model` through `sentencepiece`; chat templates
rendered in a Jinja sandbox the way HF transformers renders them; a streaming decoder that never splits a character."""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from .errors import TinygenError


class Tokenizer:
    """Text <-> ids for one checkpoint, plus its special tokens and chat template."""

    def __init__(self, model_dir: str | Path, eos_token_ids: tuple[int, ...] = ()):
        model_dir = Path(model_dir)
        self.config = _read_json(model_dir / "tokenizer_config.json")
        template_file = model_dir / "chat_template.jinja"  # where transformers 5 saves it
        self.chat_template = self.config.get("chat_template") or (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else None)
        if (model_dir / "tokenizer.json").is_file():
            self._backend = _HFBackend(model_dir / "tokenizer.json")
        elif (model_dir / "tokenizer.model").is_file():
            self._backend = _SentencePieceBackend(model_dir / "tokenizer.model")
        else:
            raise TinygenError(f"incomplete model directory {model_dir}: no tokenizer.json or tokenizer.model")
        self.vocab_size = self._backend.vocab_size
        self.special_ids = frozenset(self._backend.special_ids)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        eos = set(eos_token_ids)
        if self.eos_token is not None and self._backend.token_to_id(self.eos_token) is not None:
            eos.add(self._backend.token_to_id(self.eos_token))
        self.eos_ids = frozenset(eos)
        self.add_bos = bool(self.config.get("add_bos_token", False))

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Ids for `text`; special-token strings in it become their ids. `bos` prepends BOS if the model uses one."""
        ids = self._backend.encode(text)
        bos_id = self._backend.token_to_id(self.bos_token) if self.bos_token else None
        if bos and bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id] + ids
        return ids

    def encode_prompt(self, text: str, system: str | None = None, chat: bool = True) -> list[int]:
        """A user message's ids as the model is asked it: through the chat template (with `system`), or raw text
        with BOS where the model uses one (chat=False). The template brings its own BOS where it has one."""
        if not chat:
            return self.encode(text, bos=self.add_bos)
        messages = [{"role": "system", "content": system}] if system is not None else []
        return self.encode(self.render_chat(messages + [{"role": "user", "content": text}]))

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._backend.decode(ids, skip_special)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens included)."""
        return self._backend.decode([token_id], False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template applied to `messages` ([{"role": ..., "content": ...}])."""
        if not self.chat_template:
            raise TinygenError("this checkpoint has no chat template: use --no-chat for raw completion")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise TinygenError(f"chat template failed: {e}") from None


class StreamDecoder:
    """Turns a stream of ids into text pieces, holding back bytes until they form whole characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        # Decode a short window with some context before it, so leading spaces come out right.
        before = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinygenError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class _HFBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise TinygenError(f"cannot load {path}: {e}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = [i for i, t in self.tok.get_added_tokens_decoder().items() if t.special]

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special):
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, text):
        return self.tok.token_to_id(text)


class _SentencePieceBackend:
    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise TinygenError(f"cannot load {path}: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.special_ids = [i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)]
        # sentencepiece does not parse special-token strings inside text: split on them ourselves.
        pieces = sorted((self.sp.id_to_piece(i) for i in self.special_ids if not self.sp.is_unknown(i)), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def encode(self, text):
        if self._split is None:
            return self.sp.encode(text)
        ids = []
        for part in self._split.split(text):
            if part:
                sid = self.sp.piece_to_id(part)
                ids += [sid] if sid in self.special_ids and self.sp.id_to_piece(sid) == part else self.sp.encode(part)
        return ids

    def decode(self, ids, skip_special):
        if skip_special:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        out, run = [], []
        for i in ids:  # sentencepiece drops control pieces when decoding: put their text back
            if i in self.special_ids:
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def token_to_id(self, text):
        i = self.sp.piece_to_id(text)
        return i if self.sp.id_to_piece(i) == text else None
