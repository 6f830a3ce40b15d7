"""Remote engines behind the generation API: Codec HTTP servers, vLLM, SGLang and llama.cpp.

* :mod:`.upstream` - an upstream's address and dialect (``--engine-url``), its errors;
* :mod:`.dialects` - what every dialect provides (request, stream parser, health, discovery);
* :mod:`.codec` - Codec HTTP upstreams: frames forwarded byte for byte, the map from the upstream;
* :mod:`.engines` - vLLM ``return_token_ids``, SGLang ``/generate``, llama.cpp ``/completion``;
* :mod:`.tokenizer` - a local tokenizer (``--tokenizer``) for the map, the text and chat templates;
* :mod:`.pool` - many upstreams: dispatch by free capacity, health checks with backoff;
* :mod:`.backend` - :class:`~.backend.RemoteBackend`, the :class:`~meshnode.generation.api.Backend`.

docs/engines.md documents the dialects, their fields (with sources) and their caveats.
"""
