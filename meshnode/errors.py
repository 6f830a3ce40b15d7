"""Exception hierarchy: every meshnode error derives from MeshError."""

from __future__ import annotations


class MeshError(Exception):
    """Root of all meshnode errors."""


class ProtocolError(MeshError):
    """Bytes or JSON from a peer or relay that violate a wire format."""


class FrameError(ProtocolError):
    """A Codec frame, envelope or compressed stream is malformed or over a limit."""


class ConfigError(MeshError):
    """A setting is invalid; the message names the key and where the value came from."""


class ModelError(MeshError):
    """A model cannot be found, loaded or converted."""


class AdmissionError(MeshError):
    """A generation request is refused (too long, too many, bad parameters)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
