"""The CUDA engine: slot KV cache, CUDA graphs, GPU sampling (see :mod:`.backend`)."""
