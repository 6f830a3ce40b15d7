// Driver-facing API of the Trystero test page (tests/browser/www/trystero.html).
//
// window.T:
//   await T.join({strategy, relayUrls, appId, roomId, password, actions, debug, handshakeTimeoutMs})
//       loads ./lib/trystero-<strategy>.js (real @trystero-p2p/<strategy>, bundled by
//       scripts/build-web.sh) and joins; relayUrls are mandatory and ICE servers are always [].
//       Returns {selfId}. Calling it again with another roomId joins a second room of the same
//       page (same selfId, so Trystero shares one connection per peer between the rooms).
//   await T.send(action, data, target?, roomId?)   data is a JSON-serialisable descriptor:
//       {kind: 'json', value} | {kind: 'string', value} | {kind: 'binary', b64}
//       | {kind: 'binary', size, seed}   (deterministic pattern, see patternBytes)
//   await T.leave(roomId?)                 one room, or all of them
//   await T.stats()                        selected ICE candidate pair of every connected peer
//   T.selfId, T.peers (active peers of the first room), T.peersIn(roomId), T.events, T.messages,
//   T.frames, T.wsLog, T.pcLog. roomId arguments default to the first room joined.
//
// T.events:   {seq, t, type: 'joinCalled'|'join'|'leave'|'joinError'|'sent'|'selfLeave'|'error',
//              roomId, peerId, ...}; t = performance.now() in ms
// T.messages: {seq, t, roomId, action, peerId, kind: 'json'|'string'|'binary', value?, size,
//              sha256?, b64? (binary <= 4096 bytes), metadata?, done}; `done` turns true once the
//              SHA-256 of a binary payload is known (immediately for the other kinds).
// T.frames:   every data-channel message in or out, decoded at the Trystero frame level
//             (trystero-wire §8.1/§8.2): {dir, frame: 'room'|'presence'|'text'|'unknown', name,
//             nonce, tag, progress, len, head, present, token}; head = payload hex (all of it up to
//             1024 bytes, else the first 24). Always on (bounded).
// T.wsLog:    relay WebSocket traffic when joined with debug: true (text, or MQTT PUBLISH decoded).

const MAX_LOG = 20000
const now = () => Math.round(performance.now() * 10) / 10
let seq = 0

const T = {
  selfId: null,
  strategy: null,
  rooms: {}, // roomId -> {room, actions}
  primary: null, // the first roomId joined (default for roomId arguments)
  events: [],
  messages: [],
  frames: [],
  wsLog: [],
  pcLog: [],
  pcs: [],
  get room() {
    return this.rooms[this.primary]?.room ?? null
  },
  get peers() {
    return this.peersIn(this.primary)
  },
  peersIn(roomId) {
    const entry = this.rooms[roomId ?? this.primary]
    return entry ? Object.keys(entry.room.getPeers()) : []
  },
  join,
  send,
  leave,
  stats,
  patternBytes,
  sha256Hex,
}
window.T = T

const record = (list, entry) => {
  const stored = { seq: seq++, t: now(), ...entry }
  if (list.length < MAX_LOG) list.push(stored)
  return stored
}
const event = (type, fields) => record(T.events, { type, ...fields })

// ---------------------------------------------------------------- payloads

// Deterministic test bytes; tests/browser/conftest.py has the same function (pattern_bytes).
function patternBytes(size, seed = 0) {
  const out = new Uint8Array(size)
  for (let i = 0; i < size; i++) out[i] = (seed + i * 131 + (i >>> 11)) & 0xff
  return out
}

function b64ToBytes(b64) {
  const bin = atob(b64)
  const out = new Uint8Array(bin.length)
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i)
  return out
}

function bytesToB64(bytes) {
  let bin = ''
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000))
  }
  return btoa(bin)
}

const hex = bytes => Array.from(bytes, b => b.toString(16).padStart(2, '0')).join('')

async function sha256Hex(bytes) {
  return hex(new Uint8Array(await crypto.subtle.digest('SHA-256', bytes)))
}

function toPayload(data) {
  switch (data?.kind) {
    case 'json':
      return data.value
    case 'string':
      if (typeof data.value !== 'string') throw new TypeError('string payload needs a string value')
      return data.value
    case 'binary':
      return data.b64 !== undefined ? b64ToBytes(data.b64) : patternBytes(data.size, data.seed ?? 0)
    default:
      throw new TypeError(`unknown payload descriptor ${JSON.stringify(data)}`)
  }
}

// ---------------------------------------------------------------- frame tap

const textDecoder = new TextDecoder()

function decodeFrame(dir, peerIndex, data) {
  if (typeof data === 'string') return { dir, pc: peerIndex, frame: 'text', len: data.length }
  const u8 = data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  if (u8[0] === 1 && u8.length >= 3) {
    const L = (u8[1] << 8) | u8[2]
    const token = textDecoder.decode(u8.subarray(3, 3 + L))
    const chunk = u8.subarray(3 + L)
    return {
      dir, pc: peerIndex, frame: 'room', token,
      name: textDecoder.decode(chunk.subarray(0, 32)).replace(/\0/g, ''),
      nonce: (chunk[32] << 8) | chunk[33],
      tag: chunk[34],
      progress: chunk[35],
      len: chunk.length - 36,
      // the whole payload of small chunks (byte-exact checks), the first bytes of large ones
      head: hex(chunk.subarray(36, 36 + (chunk.length - 36 <= 1024 ? 1024 : 24))),
    }
  }
  if (u8[0] === 2 && u8.length >= 4) {
    const L = (u8[2] << 8) | u8[3]
    return { dir, pc: peerIndex, frame: 'presence', present: u8[1], token: textDecoder.decode(u8.subarray(4, 4 + L)) }
  }
  return { dir, pc: peerIndex, frame: 'unknown', len: u8.length, head: hex(u8.subarray(0, 32)) }
}

function tapChannel(pcIndex, channel) {
  channel.addEventListener('message', e => {
    if (e.data instanceof Blob) record(T.frames, { dir: 'in', pc: pcIndex, frame: 'blob', len: e.data.size })
    else record(T.frames, decodeFrame('in', pcIndex, e.data))
  })
  const send = channel.send.bind(channel)
  channel.send = data => {
    record(T.frames, decodeFrame('out', pcIndex, data))
    return send(data)
  }
  for (const type of ['open', 'close', 'error']) {
    channel.addEventListener(type, () => record(T.pcLog, { pc: pcIndex, channel: type }))
  }
}

// Passed to Trystero as rtcPolyfill: a real RTCPeerConnection that logs states and taps channels.
class TappedPeerConnection extends RTCPeerConnection {
  constructor(config) {
    super(config)
    const index = T.pcs.length
    T.pcs.push(this)
    this.addEventListener('datachannel', e => tapChannel(index, e.channel))
    for (const type of ['connectionstatechange', 'iceconnectionstatechange']) {
      this.addEventListener(type, () =>
        record(T.pcLog, { pc: index, connection: this.connectionState, ice: this.iceConnectionState }))
    }
    this.__index = index
  }

  createDataChannel(...args) {
    const channel = super.createDataChannel(...args)
    tapChannel(this.__index, channel)
    return channel
  }
}

// ---------------------------------------------------------------- relay tap (debug)

function mqttPublishes(u8) {
  // Decode MQTT PUBLISH packets (possibly several per WebSocket frame) into {topic, payload}.
  const out = []
  let i = 0
  while (i < u8.length) {
    const type = u8[i] >> 4
    const qos = (u8[i] >> 1) & 3
    let len = 0
    let mult = 1
    let j = i + 1
    for (; j < u8.length; j++) {
      len += (u8[j] & 127) * mult
      mult *= 128
      if (!(u8[j] & 128)) break
    }
    const start = j + 1
    const end = start + len
    if (type === 3) {
      const tl = (u8[start] << 8) | u8[start + 1]
      const topic = textDecoder.decode(u8.subarray(start + 2, start + 2 + tl))
      const body = start + 2 + tl + (qos ? 2 : 0)
      out.push({ mqtt: 'publish', topic, payload: textDecoder.decode(u8.subarray(body, end)) })
    } else {
      out.push({ mqtt: type })
    }
    i = end
  }
  return out
}

function logWs(dir, url, data) {
  if (typeof data === 'string') {
    record(T.wsLog, { dir, url, text: data.length > 4000 ? data.slice(0, 4000) + '…' : data })
    return
  }
  const u8 = data instanceof ArrayBuffer ? new Uint8Array(data) : ArrayBuffer.isView(data)
    ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : null
  if (!u8) {
    record(T.wsLog, { dir, url, binary: String(data) })
    return
  }
  try {
    for (const p of mqttPublishes(u8)) record(T.wsLog, { dir, url, ...p })
  } catch (err) {
    record(T.wsLog, { dir, url, hex: hex(u8.subarray(0, 256)) })
  }
}

function installWebSocketTap() {
  const Base = window.WebSocket
  if (Base.__tapped) return
  class TappedWebSocket extends Base {
    constructor(url, protocols) {
      super(url, protocols)
      record(T.wsLog, { dir: 'open', url: String(url) })
      this.addEventListener('message', e => {
        if (e.data instanceof Blob) e.data.arrayBuffer().then(b => logWs('in', this.url, b))
        else logWs('in', this.url, e.data)
      })
      this.addEventListener('close', e => record(T.wsLog, { dir: 'close', url: this.url, code: e.code }))
    }

    send(data) {
      logWs('out', this.url, data)
      return super.send(data)
    }
  }
  TappedWebSocket.__tapped = true
  window.WebSocket = TappedWebSocket
}

// ---------------------------------------------------------------- API

function describe(data) {
  if (data instanceof Uint8Array) return { kind: 'binary', size: data.byteLength }
  if (typeof data === 'string') return { kind: 'string', value: data, size: data.length }
  return { kind: 'json', value: data, size: JSON.stringify(data)?.length ?? 0 }
}

function roomEntry(roomId) {
  const entry = T.rooms[roomId ?? T.primary]
  if (!entry) throw new Error(`not in room ${roomId ?? T.primary}`)
  return entry
}

function action(name, roomId) {
  const entry = roomEntry(roomId)
  if (!entry.actions[name]) {
    const act = entry.room.makeAction(name)
    const rid = entry.roomId
    act.onMessage = (data, { peerId, metadata }) => {
      const rec = record(T.messages, {
        roomId: rid, action: name, peerId, ...describe(data), metadata, done: false,
      })
      if (data instanceof Uint8Array) {
        if (data.byteLength <= 4096) rec.b64 = bytesToB64(data)
        sha256Hex(data).then(h => {
          rec.sha256 = h
          rec.done = true
        })
      } else {
        rec.done = true
      }
    }
    entry.actions[name] = act
  }
  return entry.actions[name]
}

async function join({
  strategy, relayUrls, appId, roomId, password = '', actions = ['json', 'bin', 'text'],
  debug = false, handshakeTimeoutMs,
}) {
  if (T.rooms[roomId]) throw new Error(`already in room ${roomId}`)
  if (!Array.isArray(relayUrls) || relayUrls.length === 0) {
    throw new Error('relayUrls is required (never fall back to public relays)')
  }
  if (debug) installWebSocketTap()
  const mod = await import(`./lib/trystero-${strategy}.js`)
  if (T.selfId && T.selfId !== mod.selfId) throw new Error('one strategy per page (one selfId)')
  T.strategy = strategy
  T.selfId = mod.selfId
  const config = {
    appId,
    relayConfig: { urls: relayUrls },
    rtcConfig: { iceServers: [] },
    rtcPolyfill: TappedPeerConnection,
  }
  if (password) config.password = password
  const callbacks = {
    onJoinError: e => event('joinError', { roomId, peerId: e.peerId, error: String(e.error) }),
  }
  if (handshakeTimeoutMs) callbacks.handshakeTimeoutMs = handshakeTimeoutMs
  event('joinCalled', { roomId, strategy, appId })
  const room = mod.joinRoom(config, roomId, callbacks)
  T.rooms[roomId] = { roomId, room, actions: {} }
  T.primary ??= roomId
  room.onPeerJoin = peerId => event('join', { roomId, peerId })
  room.onPeerLeave = peerId => event('leave', { roomId, peerId })
  for (const name of actions) action(name, roomId)
  return { selfId: T.selfId }
}

async function send(name, data, target, roomId) {
  const payload = toPayload(data)
  const act = action(name, roomId)
  const started = now()
  await act.send(payload, target ? { target } : undefined)
  const size = payload instanceof Uint8Array ? payload.byteLength : undefined
  event('sent', {
    roomId: roomId ?? T.primary, action: name, target: target ?? null, kind: data.kind, size,
    ms: now() - started,
  })
  return { size }
}

async function leave(roomId) {
  const ids = roomId ? [roomId] : Object.keys(T.rooms)
  for (const id of ids) {
    const entry = T.rooms[id]
    if (!entry) continue
    await entry.room.leave()
    delete T.rooms[id]
    event('selfLeave', { roomId: id })
  }
  if (!T.rooms[T.primary]) T.primary = Object.keys(T.rooms)[0] ?? null
}

async function stats() {
  const out = {}
  const peers = Object.assign({}, ...Object.values(T.rooms).map(e => e.room.getPeers()))
  for (const [peerId, pc] of Object.entries(peers)) {
    const report = await pc.getStats()
    let pairId = null
    report.forEach(s => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId
    })
    if (!pairId) {
      report.forEach(s => {
        if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pairId = s.id
      })
    }
    const pair = pairId ? report.get(pairId) : null
    const cand = id => {
      const c = id ? report.get(id) : null
      return c ? { address: c.address ?? c.ip, port: c.port, protocol: c.protocol, type: c.candidateType } : null
    }
    out[peerId] = pair ? { local: cand(pair.localCandidateId), remote: cand(pair.remoteCandidateId) } : null
  }
  return out
}

window.addEventListener('error', e => event('error', { error: String(e.message) }))
window.addEventListener('unhandledrejection', e => event('error', { error: String(e.reason?.stack ?? e.reason) }))
document.body.dataset.ready = '1'
