"""Finding peers and exchanging their SDP offers/answers over public relays (Trystero-compatible).

This package knows nothing of aiortc, torch or the Legion protocol. Relay adapters are looked up by
strategy name through `signaling.registry`, which also loads third-party adapters registered under
the `meshnode.signaling` entry-point group.
"""
