// Browser entry for the Trystero nostr strategy; bundled by scripts/build-web.sh.
export * from '@trystero-p2p/nostr'
