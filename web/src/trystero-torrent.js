// Browser entry for the Trystero torrent strategy; bundled by scripts/build-web.sh.
export * from '@trystero-p2p/torrent'
