"""Text on both sides of a local model: the chat template and tokenizer, and incremental decoding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshnode.errors import AdmissionError, ModelError
from meshnode.generation.api import Decoder

__all__ = ["HFText", "IncrementalText"]


class HFText:
    """A :class:`~meshnode.generation.api.TextCodec` over a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any, model_id: str = "local") -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Apply the chat template (with the generation prompt) and tokenize.

        Raises:
            AdmissionError: The messages are malformed or the template rejects them
                (``field="messages"``).
            ModelError: The tokenizer has no chat template.
        """
        given: object = messages  # the type is what callers promise; peers send anything
        if not isinstance(given, Sequence) or isinstance(given, (str, bytes)) or not given:
            raise AdmissionError("messages must be a non-empty list", field="messages")
        for message in messages:
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise AdmissionError("each message needs a string 'role'", field="messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelError(f"{self.model_id} has no chat template")
        try:
            ids = self.tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
        except Exception as exc:
            # Jinja templates raise arbitrary errors (TemplateError, TypeError, raise_exception).
            raise AdmissionError(f"chat template rejected the messages: {exc}", field="messages") from exc
        if isinstance(ids, Mapping):  # some tokenizers still return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode_text(self, text: str) -> list[int]:
        """Tokenize plain text (no chat template, no special tokens added)."""
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Turn ids into text, special tokens skipped."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


class IncrementalText:
    """Decode a growing id list into text deltas; never emits half of a multi-byte character."""

    def __init__(self, text: Decoder) -> None:
        self._text = text
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""

    def push(self, ids: Sequence[int], *, final: bool = False) -> str:
        self._ids.extend(ids)
        text = self._text.decode(self._ids)
        # A trailing U+FFFD means an incomplete UTF-8 sequence: wait for the next ids.
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted :]
        self._emitted = len(text)
        self.text = text
        return delta
