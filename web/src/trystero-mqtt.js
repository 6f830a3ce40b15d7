// Browser entry for the Trystero mqtt strategy; bundled by scripts/build-web.sh.
export * from '@trystero-p2p/mqtt'
