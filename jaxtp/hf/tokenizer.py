"""Hugging Face fast tokenizers and chat templates, without transformers.

Text goes through the `tokenizers` library on the checkpoint's tokenizer.json; chat templates render in the
Jinja sandbox, options, filters and variables that transformers' `apply_chat_template` uses
(transformers/utils/chat_template_utils.py), so prompts match transformers character for character.
A chat template ships with the checkpoint, so it is untrusted code: it only runs in jinja2's
ImmutableSandboxedEnvironment, which refuses private attributes and methods that mutate their object.
"""

from __future__ import annotations

import datetime
import functools
import json
import pathlib
from collections.abc import Mapping

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

__all__ = ["Tokenizer", "tokenizer"]

# transformers' named special tokens; other `*_token` keys in tokenizer_config.json join them as template variables.
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = (
    "reasoning_content",
    "thinking",
    "reasoning",
)  # names transformers copies a message's reasoning to
SAVE_FIX = "jaxtp reads fast tokenizers only: save one with transformers' tokenizer.save_pretrained(dir)"


def _json(path: pathlib.Path) -> dict:
    """A side file transformers reads if present; {} if absent."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save or re-download the checkpoint") from None


def _content(token):
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict holding "content"."""
    return token.get("content") if isinstance(token, dict) else token


class _TemplateDict:
    """`dict` for templates (as transformers): builds dicts, but exposes no class or attributes to climb through."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template can't plant dunders (as transformers)."""

    def __init__(*args, **kwargs):  # jinja's signature trick: `namespace(self=...)` stays a plain attribute
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes ({name!r})"
            )


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body, as in transformers (which also tracks the span)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, & and '; chat templates expect plain JSON, as transformers gives them.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    """Compile in the sandbox with transformers' options, extensions, filters and globals."""
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes; pip install -U 'jinja2>=3.1.6'"
        )
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
        strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt),
    )
    return env.from_string(source)


def _plain(value):
    """Template inputs rebuilt from JSON types (as transformers does): no caller object's methods reach the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, ...) back to the base type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"  # templates only test media for presence


def _message(message: dict) -> dict:
    """Drop None fields and alias the reasoning field, as transformers does before rendering."""
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    return (
        message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}
    )


class Tokenizer:
    """A checkpoint's tokenizer.json plus what transformers reads beside it (special tokens, eos ids, chat template)."""

    def __init__(self, path):
        path = pathlib.Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} is not a directory; pass a Hugging Face checkpoint's local directory"
            )
        if not (path / "tokenizer.json").is_file():
            only_spm = " (only a sentencepiece tokenizer.model)" * (path / "tokenizer.model").is_file()
            raise FileNotFoundError(f"{path} has no tokenizer.json{only_spm}; {SAVE_FIX}")
        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_truncation()  # transformers encodes without the truncation/padding a tokenizer.json may carry
        self._tok.no_padding()
        cfg = _json(path / "tokenizer_config.json")
        if (
            "added_tokens_decoder" not in cfg
        ):  # transformers reads the legacy special_tokens_map.json only then
            cfg = {**cfg, **_json(path / "special_tokens_map.json")}
        self._tok.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        self.special_tokens = {
            k: _content(v)
            for k, v in cfg.items()  # template variables, as special_tokens_map
            if isinstance(v, str) and k.endswith("_token") or k in NAMED and isinstance(v, dict)
        }
        if isinstance(cfg.get("extra_special_tokens"), dict):
            self.special_tokens.update({k: _content(v) for k, v in cfg["extra_special_tokens"].items()})
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        # transformers adds named/extra special tokens missing from tokenizer.json's added tokens, so do the same.
        extra = cfg.get("extra_special_tokens", cfg.get("additional_special_tokens"))
        extra = [_content(t) for t in extra] if isinstance(extra, list) else []
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys([*self.special_tokens.values(), *extra]) if t not in added]
        if missing:
            self._tok.add_tokens([tokenizers.AddedToken(t, special=True) for t in missing])
        # transformers skips clean_up_tokenization_spaces for BPE, where it would eat real spaces before punctuation.
        is_bpe = type(self._tok.model).__name__ == "BPE"
        self._clean_up = bool(cfg.get("clean_up_tokenization_spaces", False)) and (
            not is_bpe
            or cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        )
        self.chat_templates = self._chat_templates(cfg)
        eos = _json(path / "generation_config.json").get("eos_token_id")
        eos = _json(path / "config.json").get("eos_token_id") if eos is None else eos
        if eos is None and self.eos_token is not None:
            eos = self._tok.token_to_id(self.eos_token)
        self.eos_token_ids: list[int] = [
            int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None
        ]

    def _chat_templates(self, cfg) -> dict[str, str]:
        """name -> template; chat_template.jinja and additional_chat_templates/*.jinja win over the config entry."""
        files = {p.stem: p for p in sorted((self.path / "additional_chat_templates").glob("*.jinja"))}
        if (self.path / "chat_template.jinja").is_file():
            files["default"] = self.path / "chat_template.jinja"
        if files:
            return {name: p.read_text(encoding="utf-8") for name, p in files.items()}
        entry = cfg.get("chat_template")
        if isinstance(entry, list):
            return {t["name"]: t["template"] for t in entry}
        return {"default": entry} if isinstance(entry, str) else {}

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    bos_token_id = property(
        lambda self: None if self.bos_token is None else self._tok.token_to_id(self.bos_token)
    )
    pad_token_id = property(
        lambda self: None if self.pad_token is None else self._tok.token_to_id(self.pad_token)
    )
    eos_token_id = property(lambda self: self.eos_token_ids[0] if self.eos_token_ids else None)
    vocab_size = property(lambda self: self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character offsets in `text` (bits/byte needs the bytes a token covers)."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(ids)] if not hasattr(ids, "__iter__") else [int(i) for i in ids]  # numpy/jax ids welcome
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up:  # transformers' clean_up_tokenization, for WordPiece-era tokenizers
            for before, after in (
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ):
                text = text.replace(before, after)
        return text

    def apply_chat_template(
        self,
        messages,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        tools=None,
        documents=None,
        chat_template: str | None = None,
        **kwargs,
    ):
        """Render `messages` as transformers does (string), or its ids without added BOS/EOS if `tokenize`."""
        templates = self.chat_templates
        if chat_template in templates:
            chat_template = templates[chat_template]
        elif chat_template is None:
            name = "tool_use" if tools is not None and "tool_use" in templates else "default"
            if not templates:
                raise ValueError(
                    f"{self.path} has no chat template (tokenizer_config.json 'chat_template' or "
                    "chat_template.jinja); pass chat_template=... or add one to the checkpoint"
                )
            if name not in templates:
                raise ValueError(
                    f"{self.path} has chat templates {sorted(templates)} but none named 'default'; "
                    "pass chat_template=NAME"
                )
            chat_template = templates[name]
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be JSON-schema dicts")
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise TypeError("documents must be dicts with 'title' and 'text' keys")
        variables = _plain(
            {**self.special_tokens, **kwargs}
        )  # kwargs override special tokens, as in transformers
        text = _compile(chat_template).render(
            messages=_plain([_message(m) for m in messages]),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def tokenizer(path) -> Tokenizer:
    """The tokenizer of the Hugging Face checkpoint directory `path` (needs its tokenizer.json)."""
    return Tokenizer(path)
