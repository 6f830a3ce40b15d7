// A local WebTorrent tracker for tests (test-harness §5.3): bittorrent-tracker's Server with HTTP and
// WebSocket on 127.0.0.1:<port>. Usage: node bench/lab/tracker.mjs <port>   (started by bench/lab/relays.py)
//
// The package lives in web/node_modules; it is imported by path because ES module resolution starts
// at this file, not at the working directory.
import { pathToFileURL } from 'node:url'
import path from 'node:path'

const port = Number.parseInt(process.argv[2] ?? '', 10)
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node tracker.mjs <port>')
  process.exit(2)
}
const here = path.dirname(new URL(import.meta.url).pathname)
const entry = path.join(here, '..', '..', 'web', 'node_modules', 'bittorrent-tracker', 'index.js')
const { Server } = await import(pathToFileURL(entry).href)

const server = new Server({ udp: false, http: true, ws: true, stats: false, interval: 10000 })
server.on('error', (err) => {
  console.error('tracker error:', err?.message ?? err)
  process.exit(1)
})
server.on('warning', (err) => console.error('tracker warning:', err?.message ?? err))
server.on('listening', () => console.log(`tracker listening on ws://127.0.0.1:${port}`))
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close(() => process.exit(0)))
}
server.listen(port, '127.0.0.1')
