"""A local tokenizer for remote upstreams that serve no map (``--tokenizer PATH``).

``PATH`` is a Hugging Face tokenizer folder (``tokenizer.json``, optionally
``tokenizer_config.json`` / ``chat_template.jinja`` with the chat template) or a ``tokenizer.json``
file. It is read with the ``tokenizers`` library (no torch): it supplies the Codec map (through
:class:`~meshnode.generation.modelinfo.ModelInfo`), the text of generated ids, and, for upstreams
that take ids (SGLang ``/generate``, llama.cpp ``/completion``), the chat template rendered here
with a sandboxed Jinja environment like the one transformers uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from meshnode.errors import AdmissionError, ConfigError
from meshnode.generation.modelinfo import ModelInfo

__all__ = ["LocalTokenizer"]


def _token_text(value: Any) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken object."""
    if isinstance(value, Mapping):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class LocalTokenizer:
    """A ``tokenizers.Tokenizer`` plus the folder's chat template (see the module docstring).

    Raises:
        ConfigError: The path holds no ``tokenizer.json``, or it cannot be read.
    """

    def __init__(self, path: str | Path) -> None:
        given = Path(path).expanduser()
        folder = given if given.is_dir() else given.parent
        file = given / "tokenizer.json" if given.is_dir() else given
        if not file.is_file():
            raise ConfigError(f"--tokenizer {path}: no tokenizer.json there (a fast Hugging Face tokenizer is needed)")
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception on a bad file
            raise ConfigError(f"--tokenizer {path}: cannot read {file.name}: {exc}") from exc
        self.path = given
        self.name = folder.name if given.is_dir() or file.name == "tokenizer.json" else file.stem
        config: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--tokenizer {path}: bad tokenizer_config.json: {exc}") from exc
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        jinja_file = folder / "chat_template.jinja"
        if not isinstance(template, str) and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        self._special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "unk_token",
                                                                          "pad_token")}
        self._compiled: jinja2.Template | None = None

    def model_info(self, model_id: str) -> ModelInfo:
        """The map of this tokenizer, under the family a browser picks for ``model_id``."""
        return ModelInfo(model_id=model_id, tokenizer=self.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        """Plain text to ids (special-token text is recognised, nothing added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Render the chat template (with the generation prompt) and tokenize.

        Raises:
            AdmissionError: No chat template, or the template rejects the messages.
        """
        if self.chat_template is None:
            raise AdmissionError(f"--tokenizer {self.path} has no chat template: this upstream needs one for chat "
                                 "prompts", field="messages")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
            env.globals.update(raise_exception=_raise,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._compiled = env.from_string(self.chat_template)
        try:
            text = self._compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=True,
                                         **self._special)
        except jinja2.TemplateError as exc:
            raise AdmissionError(f"chat template rejected the messages: {exc}", field="messages") from exc
        return self.encode_text(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text, special tokens skipped."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
