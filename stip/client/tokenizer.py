"""The bundle's tokenizer without transformers: `tokenizers` for the text, jinja2 for the chat template.

`LightTokenizer` answers the calls the client makes of a transformers tokenizer (`tok(text)["input_ids"]`, `decode`,
`apply_chat_template`, `convert_ids_to_tokens`, `all_special_ids`, `backend_tokenizer`), the same way: the encoding is
tokenizer.json's own (its post-processor adds what transformers adds, since transformers wrote that file), and the
chat template renders as transformers' `render_jinja_template` renders it (a sandboxed jinja2 environment with
trim_blocks and lstrip_blocks, the loop controls, its `tojson`, `raise_exception` and `strftime_now`, the special
tokens as variables, `add_generation_prompt`, `tools`, `documents`, `continue_final_message`). tests/test_light_client
checks both against transformers on the bundles it has.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from stip.errors import BundleError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FINAL_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with its content."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class LightTokenizer:
    """A bundle's tokenizer.json, tokenizer_config.json and chat template (only files its signed manifest lists)."""

    def __init__(self, tokenizer_json: Path, config: dict, chat_template: str | dict | None):
        from tokenizers import Tokenizer

        try:
            self.backend_tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:
            raise BundleError(f"{tokenizer_json} is not a tokenizers file: {e}") from None
        self.backend_tokenizer.no_padding()
        self.backend_tokenizer.no_truncation()
        self.config = config
        self.padding_side = config.get("padding_side") or "right"
        self.truncation_side = config.get("truncation_side") or "right"
        self._padded: dict[int, object] = {}  # max_length -> a backend copy that pads and truncates (`batch`)
        self.chat_template = chat_template
        self.special_tokens_map = {n: t for n in SPECIAL_NAMES if (t := _content(config.get(n))) is not None}
        for name, token in self.special_tokens_map.items():
            setattr(self, name, token)

    @classmethod
    def load(cls, folder: Path, has_file) -> "LightTokenizer":
        """From a bundle folder; `has_file(name)`: whether the signed manifest lists it (only those are read)."""
        if not has_file("tokenizer.json"):
            raise BundleError(f"client bundle {folder} has no tokenizer.json (a fast tokenizer); the light client "
                              f"reads only that format")
        config = json.loads((folder / "tokenizer_config.json").read_text()) if has_file("tokenizer_config.json") \
            else {}
        template = config.get("chat_template")
        if has_file("chat_template.jinja"):
            template = (folder / "chat_template.jinja").read_text()
        elif has_file("chat_template.json"):
            template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}
        return cls(folder / "tokenizer.json", config, template)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, added tokens not counted (transformers' `vocab_size`)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        """{"input_ids": ids} for a text, or a list of id lists for a list of texts (no padding)."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        batch = self.backend_tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in batch]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def batch(self, texts: list[str], max_length: int) -> dict:
        """Texts padded to the longest and cut at `max_length` tokens, as transformers' `tok(texts, padding=True,
        truncation=True, max_length=...)` does (the backend's own padding and longest-first truncation, on its sides):
        int64 numpy arrays input_ids, token_type_ids and attention_mask [B, T]."""
        import numpy as np

        backend = self._padded.get(max_length)
        if backend is None:
            from tokenizers import Tokenizer

            pad = self.special_tokens_map.get("pad_token")
            pad_id = None if pad is None else self.backend_tokenizer.token_to_id(pad)
            if pad_id is None and len(texts) > 1:
                raise ValueError("this tokenizer has no padding token: pass one text at a time")
            backend = Tokenizer.from_str(self.backend_tokenizer.to_str())  # its own state: thread-safe to share
            backend.enable_truncation(max_length, strategy="longest_first", direction=self.truncation_side)
            if pad_id is not None:
                backend.enable_padding(direction=self.padding_side, pad_id=pad_id, pad_type_id=0, pad_token=pad)
            self._padded[max_length] = backend
        enc = backend.encode_batch(list(texts), add_special_tokens=True)
        return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = False) -> str:
        """`clean_up_tokenization_spaces` None: as the tokenizer's config says (transformers' default), which
        WordPiece decoders (BERT) use; byte-level BPE skips it, as transformers does."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        if clean_up_tokenization_spaces and type(self.backend_tokenizer.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)  # transformers' clean_up_tokenization
        return text

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int) or hasattr(ids, "__index__"):
            return self.backend_tokenizer.id_to_token(int(ids))
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def mask_token_id(self) -> int | None:
        return self._special_id("mask_token")

    @property
    def model_max_length(self) -> int:
        return int(self.config.get("model_max_length") or 0)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    @property
    def all_special_ids(self) -> list[int]:
        """The named special tokens' ids, then the config's extra ones, as transformers lists them."""
        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        extra = extra.values() if isinstance(extra, dict) else extra
        tokens = [*self.special_tokens_map.values(), *(t for t in map(_content, extra) if t)]
        ids = [self.backend_tokenizer.token_to_id(t) for t in tokens]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        """The template to render, as transformers picks it (a named "tool_use" template where tools are given)."""
        template = chat_template or self.chat_template
        if isinstance(template, dict):
            if chat_template in template:
                return template[chat_template]
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
            template = template.get(name)
        if not template:
            raise ValueError("this tokenizer has no chat template; pass prompt text or token ids instead of messages")
        return template

    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, return_dict: bool = True, **kwargs):
        """The chat rendered by its template (one conversation); with `tokenize`, its ids (a dict with
        "input_ids" where `return_dict`, as transformers 5 answers), encoded without adding special tokens."""
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ValueError("the light tokenizer takes tools as JSON schemas (dicts), not functions")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        chat = [dict(m) for m in conversation]
        if continue_final_message:
            chat[-1]["content"] = chat[-1]["content"] + _FINAL_TAG
        text = _compile(self.get_chat_template(chat_template, tools)).render(
            messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs})
        if continue_final_message:  # cut at the tag, as transformers does (its spacing kept where the template kept it)
            tag = _FINAL_TAG.strip()
            if tag not in text:
                raise ValueError("continue_final_message is set but the template dropped the final message")
            at = text.rindex(tag)
            text = text[:at] if text[at:at + len(_FINAL_TAG)] == _FINAL_TAG else text[:at].rstrip()
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids
