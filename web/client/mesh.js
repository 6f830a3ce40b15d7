// MeshClient: joins an Unstable Legion room with Trystero and asks meshnode peers for completions.
//
// Actions (legion-mesh §5.2): cap (JSON), cm (JSON), cf (binary Codec frames / envelopes), tc (JSON).
// * cap: our own cap (no engine, no tools) on join, to each joiner and every 30 s; a roster of the
//   other peers' caps that pass the browser guard, pruned after 90 s of silence.
// * ask(): engine_run through tc, unicast to one peer, after a HELLO envelope whose stream id is the
//   callId (identity compression), so DATA/END envelopes for this call can be told apart from any
//   other stream; frames are detokenized as they arrive with the peer's map.
// * ai(): "/ai <prompt>" as cm (broadcast, or unicast for "/ai @nick ..."); responders stream bare
//   frames, one stream per sending peer until a done frame.
// All state is plain data in `state` (the page renders it; tests read it via window.meshClient).

import { CodecError, DATA, END, READY, cancelEnvelope, decodeCf, decodeFrame, helloEnvelope } from './codec.js'
import { Detokenizer, MapError, loadMapFromOrigin, mapIdForCap, tokenMapFromDocument } from './detok.js'
import { capProblem, chatProblem, resultText, toolFrameProblem } from './guards.js'

const STRATEGIES = {
  mqtt: () => import('@trystero-p2p/mqtt'),
  nostr: () => import('@trystero-p2p/nostr'),
  torrent: () => import('@trystero-p2p/torrent'),
}

export const CAP_HEARTBEAT_MS = 30_000
export const ROSTER_TTL_MS = 90_000
export const CALL_TIMEOUT_MS = 120_000
export const TOOL_TIMEOUT_MS = 30_000
const RESULT_GRACE_MS = 3_000
const RELAY_CHECK_MS = 1_000
export const RELAY_GRACE_MS = 8_000
const MAX_LOG = 5_000

const now = () => performance.now()
const round = (x, digits = 1) => (x === null || !Number.isFinite(x) ? null : Math.round(x * 10 ** digits) / 10 ** digits)

export function newCallId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12))
  return 'tc-' + Array.from(bytes, b => (b % 36).toString(36)).join('')
}

function toBytes(data) {
  if (data instanceof Uint8Array) return data
  if (data instanceof ArrayBuffer) return new Uint8Array(data)
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  return null
}

function parseAi(text) {
  // "/ai @nick prompt" -> {nick, prompt}; "/ai prompt" -> {nick: null, prompt}
  const rest = text.slice(4).trim()
  const m = rest.match(/^@(\S+)\s+([\s\S]*)$/)
  return m ? { nick: m[1], prompt: m[2].trim() } : { nick: null, prompt: rest }
}

export class MeshClient {
  constructor({ onChange = () => {}, relayGraceMs = RELAY_GRACE_MS } = {}) {
    this.onChange = onChange
    this.relayGraceMs = relayGraceMs
    this.room = null
    this.module = null
    this.actions = {}
    this.timers = []
    this.maps = new Map() // mapId -> Promise<{tokenMap, hash}>
    this.aiOpen = new Map() // peerId -> ai stream record
    this.pendingTools = new Map() // callId -> {resolve, timer}
    this.lastAiAskAt = null
    this.seq = 0
    this.state = {
      config: null,
      selfId: null,
      nick: null,
      joined: false,
      strategy: null,
      relays: {},
      relayCheckError: null,
      relayProblem: null,
      peers: {},
      messages: [],
      calls: {},
      aiStreams: [],
      cfLog: [],
      errors: [],
    }
  }

  changed() {
    try {
      this.onChange(this.state)
    } catch (err) {
      console.error('render failed', err)
    }
  }

  error(kind, message, extra = {}) {
    const entry = { seq: this.seq++, t: round(now()), kind, message, ...extra }
    if (this.state.errors.length < MAX_LOG) this.state.errors.push(entry)
    this.state.messages.push({ id: `m${entry.seq}`, role: 'error', kind, text: message, done: true })
    this.changed()
    return entry
  }

  // ------------------------------------------------------------------ join / leave

  async join({ strategy, relayUrls, appId, roomId, password = '', iceServers = [], nick = '' }) {
    if (this.room) throw new Error('already joined; leave first')
    if (!STRATEGIES[strategy]) {
      this.error('config', `strategy ${JSON.stringify(strategy)} cannot run in a browser: use mqtt, nostr or torrent`)
      throw new Error('unsupported strategy')
    }
    if (!Array.isArray(relayUrls) || relayUrls.length === 0) {
      this.error('config', 'no relay URLs configured: the page never falls back to public relays by itself')
      throw new Error('no relay URLs')
    }
    if (!appId || !roomId) {
      this.error('config', 'appId and room are required')
      throw new Error('missing appId/room')
    }
    const mod = await STRATEGIES[strategy]()
    this.module = mod
    const config = { appId, relayConfig: { urls: relayUrls }, rtcConfig: { iceServers } }
    if (password) config.password = password
    this.room = mod.joinRoom(config, roomId, {
      onJoinError: e => this.error('join', `peer ${e.peerId} could not join: ${e.error}` +
        (/password/i.test(String(e.error)) ? ' (check the room password)' : ''), { peerId: e.peerId }),
    })
    Object.assign(this.state, {
      selfId: mod.selfId, nick: nick || `tab-${mod.selfId.slice(0, 4)}`, joined: true, strategy,
      joinedAt: round(now()), relayUrls: [...relayUrls], appId, roomId, relayProblem: null,
    })
    for (const name of ['cap', 'cm', 'cf', 'tc']) this.actions[name] = this.room.makeAction(name)
    this.actions.cap.onMessage = (data, { peerId }) => this.onCap(peerId, data)
    this.actions.cm.onMessage = (data, { peerId }) => this.onChat(peerId, data)
    this.actions.cf.onMessage = (data, { peerId }) => this.onFrame(peerId, data)
    this.actions.tc.onMessage = (data, { peerId }) => this.onTool(peerId, data)
    this.room.onPeerJoin = peerId => {
      this.sendCap(peerId)
      this.changed()
    }
    this.room.onPeerLeave = peerId => this.onPeerLeave(peerId)
    this.sendCap()
    this.timers.push(setInterval(() => {
      this.sendCap()
      this.prune()
    }, CAP_HEARTBEAT_MS))
    this.timers.push(setInterval(() => this.checkRelays(), RELAY_CHECK_MS))
    this.checkRelays()  // list the relays as connecting at once rather than after the first tick
    this.changed()
    return { selfId: mod.selfId }
  }

  async leave() {
    const room = this.room
    if (!room) return
    for (const t of this.timers) clearInterval(t)
    this.timers = []
    this.room = null
    this.actions = {}
    for (const call of Object.values(this.state.calls)) {
      if (!call.finished) this.finishCall(call, { error: 'left the room before the answer was complete', kind: 'left' })
    }
    for (const [, pending] of this.pendingTools) pending.resolve({ status: 'error', error: 'left the room' })
    this.pendingTools.clear()
    Object.assign(this.state, { joined: false, peers: {}, relays: {}, relayProblem: null })
    this.changed()
    await room.leave()
  }

  ownCap() {
    return {
      v: 1, ts: Date.now(), nick: this.state.nick, modelId: 'none', available: false, skills: [],
      systemPromptSummary: 'meshnode web client (asks only; no local engine)', tools: [],
    }
  }

  sendCap(target) {
    if (!this.room) return
    this.actions.cap.send(this.ownCap(), target ? { target } : undefined).catch(() => {})
  }

  checkRelays() {
    if (!this.module?.getRelaySockets) return
    let sockets = {}
    try {
      sockets = this.module.getRelaySockets() ?? {}
    } catch (e) {
      this.state.relayCheckError = String(e?.message ?? e)  // shown in state dumps; the check retries
      return
    }
    this.state.relayCheckError = null
    const names = ['connecting', 'open', 'closing', 'closed']
    const relays = {}
    for (const url of this.state.relayUrls ?? []) relays[url] = 'connecting'
    for (const [url, socket] of Object.entries(sockets)) relays[url] = names[socket?.readyState] ?? 'unknown'
    const anyOpen = Object.values(relays).includes('open')
    const stale = now() - this.state.joinedAt > this.relayGraceMs
    this.state.relays = relays
    if (!anyOpen && stale && !this.state.relayProblem) {
      this.state.relayProblem = `relay unreachable: ${Object.keys(relays).join(', ')}`
      this.error('relay', `${this.state.relayProblem} — no peers can be found until it is back`)
    } else if (anyOpen && this.state.relayProblem) {
      this.state.relayProblem = null
      this.changed()
    }
  }

  prune() {
    const t = now()
    for (const [id, peer] of Object.entries(this.state.peers)) {
      if (t - peer.lastSeen > ROSTER_TTL_MS) delete this.state.peers[id]
    }
    this.changed()
  }

  onPeerLeave(peerId) {
    delete this.state.peers[peerId]
    for (const call of Object.values(this.state.calls)) {
      if (call.peerId === peerId && !call.finished) {
        this.finishCall(call, { error: `${call.nick} left the room before answering`, kind: 'peer-left' })
      }
    }
    const ai = this.aiOpen.get(peerId)
    if (ai) {
      ai.done = true
      ai.finishReason = 'peer-left'
      this.aiOpen.delete(peerId)
    }
    this.changed()
  }

  // ------------------------------------------------------------------ caps and maps

  onCap(peerId, cap) {
    const problem = capProblem(cap)
    const peer = {
      id: peerId,
      capOk: problem === null,
      capError: problem,
      cap,
      nick: typeof cap?.nick === 'string' ? cap.nick : peerId.slice(0, 8),
      modelId: cap?.modelId ?? null,
      available: problem === null && cap.available,
      load: problem === null ? cap.load ?? null : null,
      tools: problem === null ? cap.tools.map(t => t.name) : [],
      engine: problem === null && cap.tools.some(t => t.name === 'engine_run'),
      historySupported: problem === null &&
        Boolean(cap.tools.find(t => t.name === 'engine_run')?.inputSchema?.properties?.messages),
      mapId: problem === null ? mapIdForCap(cap) : null,
      mapHash: typeof cap?.mapHash === 'string' ? cap.mapHash : null,
      lastSeen: now(),
      capsSeen: (this.state.peers[peerId]?.capsSeen ?? 0) + 1,
    }
    this.state.peers[peerId] = peer
    if (problem) console.warn(`cap from ${peerId} rejected: ${problem}`)
    else if (peer.engine) this.ensureMap(peer).catch(() => {}) // warm up for /ai answers
    this.changed()
  }

  /** The peer's TokenMap, loaded once per map id (origin index first, then the peer's codec_map tool). */
  ensureMap(peer) {
    const key = `${peer.mapId}|${peer.mapHash ?? ''}`
    let promise = this.maps.get(key)
    if (!promise) {
      promise = this.loadMap(peer)
      this.maps.set(key, promise)
      promise.catch(() => this.maps.delete(key))
    }
    return promise
  }

  async loadMap(peer) {
    try {
      return await loadMapFromOrigin(peer.mapId, { expectedHash: peer.mapHash })
    } catch (err) {
      if (!peer.tools.includes('codec_map')) throw err
      console.warn(`map ${peer.mapId} not on this origin (${err.message}); asking ${peer.nick}`)
      const result = await this.callTool(peer.id, 'codec_map', {})
      if (result.status !== 'ok' || !result.result?.content?.document) {
        throw new MapError(`${peer.nick} did not send its tokenizer map: ${result.error ?? result.status}`)
      }
      return tokenMapFromDocument(result.result.content.document, peer.mapHash ?? result.result.content.map_hash)
    }
  }

  // ------------------------------------------------------------------ peers

  enginePeers() {
    return Object.values(this.state.peers).filter(p => p.capOk && p.engine)
  }

  bestPeer() {
    const ratio = p => (p.load ? (p.load.active + p.load.queued) / Math.max(1, p.load.max) : 0)
    return this.enginePeers().filter(p => p.available).sort((a, b) => ratio(a) - ratio(b) || (a.id < b.id ? -1 : 1))[0] ?? null
  }

  // ------------------------------------------------------------------ engine_run

  /**
   * Ask a peer (default: the least-loaded available one) with engine_run. Returns the callId;
   * progress is in state.calls[callId] (finished turns true at the end).
   */
  async ask(prompt, { peerId = null, maxTokens = 256, temperature = 0.7, topP, system, history = false } = {}) {
    if (!this.room) throw new Error(this.error('no-room', 'not in a room: join first').message)
    const peer = peerId ? this.state.peers[peerId] : this.bestPeer()
    if (!peer || !peer.capOk || !peer.engine) {
      const why = this.enginePeers().length
        ? 'no meshnode is available right now (all busy); try again in a moment'
        : 'no peer serving engine_run in this room yet: is `meshnode join` running with the same strategy, relays, appId and room?'
      throw new Error(this.error('no-peer', why).message)
    }
    if (!peer.available) {
      const load = peer.load ? ` (load ${peer.load.active}+${peer.load.queued}/${peer.load.max})` : ''
      throw new Error(this.error('busy', `${peer.nick} is busy${load}; try again or pick another peer`).message)
    }
    let map
    try {
      map = await this.ensureMap(peer)
    } catch (err) {
      throw new Error(this.error('map', `cannot load the tokenizer map for ${peer.nick}: ${err.message}`).message)
    }
    const callId = newCallId()
    const args = { user: prompt, max_tokens: maxTokens, temperature }
    if (topP !== undefined) args.top_p = topP
    if (system) args.system = system
    if (history && peer.historySupported) {
      // Earlier engine_run turns with this peer that completed (no /ai lines, no failed answers).
      const ok = id => this.state.calls[id]?.status === 'ok'
      const turns = this.state.messages.filter(m => m.callId && m.peerId === peer.id && m.text && ok(m.callId))
      if (turns.length) args.messages = turns.slice(-20).map(m => ({ role: m.role, content: m.text }))
    }
    const call = {
      callId, peerId: peer.id, nick: peer.nick, prompt, args, mode: null, startedAt: round(now()),
      text: '', tokens: 0, frames: 0, bytes: 0, ttftMs: null, tokPerSec: null, bytesPerToken: null,
      firstAt: null, firstTokens: 0, lastAt: null, streamDone: false, finishReason: null,
      result: null, pendingResult: null, resultText: null, status: null, error: null, finished: false,
    }
    call.detok = new Detokenizer(map.tokenMap)
    call.chain = Promise.resolve()
    Object.defineProperty(call, 'detok', { enumerable: false })
    Object.defineProperty(call, 'chain', { enumerable: false, writable: true })
    this.state.calls[callId] = call
    this.state.messages.push({ id: `u-${callId}`, role: 'user', peerId: peer.id, callId, text: prompt, done: true })
    this.state.messages.push({ id: callId, role: 'assistant', peerId: peer.id, nick: peer.nick, callId, text: '', done: false })
    call.timer = setTimeout(() => {
      if (!call.finished) this.finishCall(call, { error: `${peer.nick} sent no result within ${CALL_TIMEOUT_MS / 1000} s`, kind: 'timeout' })
    }, CALL_TIMEOUT_MS)
    Object.defineProperty(call, 'timer', { enumerable: false })
    this.changed()
    const target = { target: peer.id }
    try {
      await this.actions.cf.send(helloEnvelope(callId, peer.mapId), target)
      await this.actions.tc.send({ kind: 'call', v: 1, ts: Date.now(), callId, toolName: 'engine_run', args }, target)
    } catch (err) {
      this.finishCall(call, { error: `could not reach ${peer.nick}: ${err.message}`, kind: 'send' })
    }
    return callId
  }

  /** Ask the responder to stop (END envelope, finish_reason "cancel"); the call ends here at once. */
  cancel(callId) {
    const call = this.state.calls[callId]
    if (!call || call.finished || !this.room) return false
    this.actions.cf.send(cancelEnvelope(callId), { target: call.peerId }).catch(() => {})
    call.streamDone = true
    call.finishReason = 'cancel'
    this.finishCall(call, {})
    return true
  }

  finishCall(call, { result = null, error = null, kind = null }) {
    if (call.finished) return
    clearTimeout(call.timer)
    clearTimeout(call.pendingTimer)
    if (!call.streamDone) call.text += call.detok.flush()
    if (result) {
      call.result = result
      call.status = result.status
      call.resultText = result.status === 'ok' ? resultText(result.result) : null
      if (result.status === 'ok' && !call.text && call.resultText) call.text = call.resultText // non-streaming responder
      if (result.status === 'ok' && !call.finishReason) call.finishReason = result.result?.content?.finish_reason ?? 'stop'
      if (result.status === 'denied') error = `${call.nick} refused: ${result.error ?? 'denied'}`
      else if (result.status === 'error') error = `${call.nick} failed: ${result.error ?? 'error'}`
      kind = kind ?? result.status
    }
    call.finished = true
    call.finishedAt = round(now())
    const bubble = this.state.messages.find(m => m.id === call.callId)
    if (bubble) {
      bubble.text = call.text
      bubble.done = true
    }
    if (error) {
      call.error = error
      this.error(kind ?? 'call', error, { callId: call.callId, peerId: call.peerId })
    } else {
      this.changed()
    }
  }

  onCallFrame(call, frame, size) {
    const t = now()
    call.frames += 1
    call.bytes += size
    call.dataBytes = (call.dataBytes ?? 0) + size
    if (frame.ids.length) {
      if (call.firstAt === null) {
        call.firstAt = t
        call.firstTokens = frame.ids.length
        call.ttftMs = round(t - call.startedAt)
      }
      call.tokens += frame.ids.length
      call.lastAt = t
      const span = (call.lastAt - call.firstAt) / 1000
      if (span > 0) call.tokPerSec = round((call.tokens - call.firstTokens) / span)
    }
    // Token-carrying cf payload bytes (Trystero framing excluded) per token; READY/END are in `bytes`.
    call.bytesPerToken = call.tokens ? round(call.dataBytes / call.tokens) : null
    call.text += call.detok.render(frame.ids, { partial: !frame.done })
    if (frame.done) {
      call.streamDone = true
      call.finishReason = frame.finishReason ?? 'stop'
    }
    const bubble = this.state.messages.find(m => m.id === (call.callId ?? call.id))
    if (bubble) bubble.text = call.text
    if (call.streamDone && call.pendingResult) {
      clearTimeout(call.pendingTimer)
      this.finishCall(call, { result: call.pendingResult })
      return
    }
    this.changed()
  }

  // ------------------------------------------------------------------ cf

  logCf(entry) {
    if (this.state.cfLog.length < MAX_LOG) this.state.cfLog.push({ seq: this.seq++, t: round(now()), ...entry })
  }

  onFrame(peerId, data) {
    const bytes = toBytes(data)
    if (!bytes) {
      this.logCf({ peerId, kind: 'invalid', why: 'not binary' })
      return
    }
    let decoded
    try {
      decoded = decodeCf(bytes)
    } catch (err) {
      this.logCf({ peerId, kind: 'invalid', why: err.message, bytes: bytes.length })
      return
    }
    if (decoded.type === 'envelope') {
      const kinds = ['hello', 'ready', 'data', 'end']
      const entry = { peerId, kind: kinds[decoded.kind], stream: decoded.stream, seq: decoded.seq, bytes: bytes.length }
      const call = this.state.calls[decoded.stream]
      if (!call || call.peerId !== peerId) {
        this.logCf({ ...entry, stray: true })
        return // not a stream this tab opened with that peer
      }
      if (decoded.kind === READY) {
        this.logCf(entry)
        call.mode = 'envelope'
        call.ready = decoded.body
        call.bytes += bytes.length
        const compression = decoded.body?.compression ?? 'identity'
        if (compression !== 'identity') {
          this.cancel(call.callId)
          this.error('codec', `${call.nick} chose ${compression} compression, which this page cannot decode`)
        }
      } else if (decoded.kind === DATA) {
        let frame
        try {
          frame = decodeFrame(decoded.body)
        } catch (err) {
          this.logCf({ ...entry, kind: 'invalid', why: err.message })
          return
        }
        this.logCf({ ...entry, ids: frame.ids.length, done: frame.done })
        if (call.finished) return
        call.chain = call.chain.then(() => this.onCallFrame(call, frame, bytes.length))
      } else if (decoded.kind === END) {
        this.logCf({ ...entry, finishReason: decoded.body?.finish_reason ?? null })
        call.bytes += bytes.length
        call.endReason = decoded.body?.finish_reason ?? null
      }
      return
    }
    const frame = decoded.frame
    this.logCf({ peerId, kind: 'frame', ids: frame.ids.length, done: frame.done, bytes: bytes.length })
    // A bare frame from a peer we asked that never answered our HELLO: a legacy responder.
    const legacy = Object.values(this.state.calls).find(c => c.peerId === peerId && !c.finished && c.mode !== 'envelope')
    if (legacy && !this.aiOpen.has(peerId)) {
      legacy.mode = 'bare'
      legacy.chain = legacy.chain.then(() => this.onCallFrame(legacy, frame, bytes.length))
      return
    }
    this.onAiFrame(peerId, frame, bytes.length)
  }

  // ------------------------------------------------------------------ /ai

  /** Send "/ai <prompt>" (broadcast) or "/ai @nick <prompt>" (unicast to that peer). */
  async ai(text) {
    if (!this.room) throw new Error(this.error('no-room', 'not in a room: join first').message)
    const line = text.startsWith('/ai ') ? text : `/ai ${text}`
    const { nick, prompt } = parseAi(line)
    if (!prompt) throw new Error(this.error('input', 'usage: /ai <prompt> or /ai @nick <prompt>').message)
    let to = ''
    if (nick) {
      const peer = Object.values(this.state.peers).find(p => p.nick === nick || p.id.startsWith(nick))
      if (!peer) throw new Error(this.error('no-peer', `no peer called @${nick} in this room`).message)
      to = peer.id
    } else if (!this.enginePeers().some(p => p.available)) {
      throw new Error(this.error('no-peer', 'nobody in this room can answer /ai: no available peer serves engine_run').message)
    }
    const msg = { v: 1, ts: Date.now(), from: this.state.selfId, to, bodyKind: 'text', text: line }
    this.state.messages.push({ id: `ai-ask-${this.seq++}`, role: 'user', peerId: to || null, text: line, done: true })
    this.lastAiAskAt = now()
    this.changed()
    await this.actions.cm.send(msg, to ? { target: to } : undefined)
    return msg
  }

  onAiFrame(peerId, frame, size) {
    let stream = this.aiOpen.get(peerId)
    const peer = this.state.peers[peerId]
    if (!stream) {
      const t = now()
      stream = {
        id: `ai-${this.seq++}`, peerId, nick: peer?.nick ?? peerId.slice(0, 8), text: '', tokens: 0, frames: 0,
        bytes: 0, done: false, finishReason: null, startedAt: round(this.lastAiAskAt ?? t),
        ttftMs: null, tokPerSec: null, bytesPerToken: null, firstAt: null, firstTokens: 0, lastAt: null, error: null,
      }
      Object.defineProperty(stream, 'chain', {
        enumerable: false, writable: true,
        value: peer?.capOk
          ? this.ensureMap(peer).then(m => { Object.defineProperty(stream, 'detok', { enumerable: false, value: new Detokenizer(m.tokenMap) }) })
          : Promise.reject(new MapError('no valid cap from this peer: cannot pick a tokenizer map')),
      })
      stream.chain = stream.chain.catch(err => {
        stream.error = err.message
        this.error('map', `cannot render the answer of ${stream.nick}: ${err.message}`)
      })
      this.aiOpen.set(peerId, stream)
      this.state.aiStreams.push(stream)
      this.state.messages.push({ id: stream.id, role: 'assistant', peerId, nick: stream.nick, text: '', done: false, ai: true })
    }
    if (frame.done) this.aiOpen.delete(peerId)
    stream.chain = stream.chain.then(() => {
      if (!stream.detok) return
      this.onCallFrame(stream, frame, size)
      if (frame.done) {
        stream.done = true
        const bubble = this.state.messages.find(m => m.id === stream.id)
        if (bubble) bubble.done = true
        this.changed()
      }
    })
  }

  // ------------------------------------------------------------------ cm

  onChat(peerId, msg) {
    const problem = chatProblem(msg)
    if (problem) {
      console.warn(`cm from ${peerId} rejected: ${problem}`)
      return
    }
    if (msg.bodyKind !== 'text') return
    if (msg.to && msg.to !== this.state.selfId) return
    const nick = this.state.peers[peerId]?.nick ?? peerId.slice(0, 8)
    this.state.messages.push({ id: `c${this.seq++}`, role: 'chat', peerId, nick, text: msg.text, done: true })
    if (/^\[\/ai [^\]]*error\]/.test(msg.text)) this.error('peer', `${nick}: ${msg.text}`, { peerId })
    else this.changed()
  }

  // ------------------------------------------------------------------ tc

  /** Call a tool on one peer and wait for its result ({status, result?, error?}). */
  callTool(peerId, toolName, args = {}, timeoutMs = TOOL_TIMEOUT_MS) {
    if (!this.room) return Promise.resolve({ status: 'error', error: 'not in a room' })
    const callId = newCallId()
    return new Promise(resolve => {
      const timer = setTimeout(() => {
        this.pendingTools.delete(callId)
        resolve({ status: 'error', error: `no result within ${timeoutMs / 1000} s`, timeout: true })
      }, timeoutMs)
      this.pendingTools.set(callId, { peerId, resolve: r => { clearTimeout(timer); resolve(r) } })
      this.actions.tc.send({ kind: 'call', v: 1, ts: Date.now(), callId, toolName, args }, { target: peerId })
        .catch(err => {
          this.pendingTools.delete(callId)
          clearTimeout(timer)
          resolve({ status: 'error', error: err.message })
        })
    })
  }

  onTool(peerId, frame) {
    const problem = toolFrameProblem(frame)
    if (problem) {
      console.warn(`tc from ${peerId} rejected: ${problem}`)
      return
    }
    if (frame.kind === 'call') {
      // This page exposes no tools (legion-mesh §5.6 check 1).
      this.actions.tc.send({
        kind: 'result', v: 1, ts: Date.now(), callId: frame.callId, status: 'denied',
        error: `tool not exposed by this peer: ${frame.toolName}`,
      }, { target: peerId }).catch(() => {})
      return
    }
    const pending = this.pendingTools.get(frame.callId)
    if (pending && pending.peerId === peerId) {
      this.pendingTools.delete(frame.callId)
      pending.resolve({ status: frame.status, result: frame.result, error: frame.error })
      return
    }
    const call = this.state.calls[frame.callId]
    if (!call || call.peerId !== peerId || call.finished) return
    const result = { status: frame.status, result: frame.result, error: frame.error }
    // END normally travels before the result on the same ordered channel; should the result
    // overtake the last frames, give them a moment before finishing.
    call.chain = call.chain.then(() => {
      if (call.streamDone || frame.status !== 'ok' || call.mode !== 'envelope') {
        this.finishCall(call, { result })
        return
      }
      call.pendingResult = result
      call.pendingTimer = setTimeout(() => this.finishCall(call, { result }), RESULT_GRACE_MS)
      Object.defineProperty(call, 'pendingTimer', { enumerable: false })
    })
  }
}
