"""`meshnode bench`: how many concurrent token streams a byte-capped relay carries, per wire mode.

One serving node and N requesting peers (S streams each) talk through a real TURN relay (coturn,
relay-only ICE); the node's link to the relay is a token-bucket-shaped veth between network
namespaces, and bytes/packets are counted there by the kernel, not by the application.

Modules:
    source     recorded completion and the fixed-rate replay engine (transport, not the model)
    modes      the four wire modes (json-sse, codec, codec-zstd, meshnode)
    netlab     namespaces, veths, tc shaping, nft counters, coturn and the signalling relay
    roles      the node and peer processes that run inside the namespaces
    metrics    per-stream statistics and the service-level check
    runner     the search for the largest N per mode
    report     rich table, JSON, PNG
    command    the ``meshnode bench`` flags and entry point

The pacing the ``meshnode`` modes measure lives in :mod:`meshnode.link.pacer` (used by the services).
"""
