"""meshnode: a Python peer for browser-AI meshes (Trystero rooms, Codec frames, local LLM engine)."""

import logging

__version__ = "0.1.0"

logging.getLogger("meshnode").addHandler(logging.NullHandler())
