// The meshnode browser client: page wiring around MeshClient (mesh.js).
//
// Settings come from GET /config.json (written by `meshnode join --web`), overridden by query
// parameters: ?strategy=mqtt|nostr|torrent &relay=URL (repeatable or comma-separated) &appId= &room=
// &nick= &autojoin=0 &relayGraceMs= (how long with no open relay before it is reported down).
// The room password is never put in the page by the server: when the room has one, the page asks.
//
// window.meshClient is a small hook for tests and the console: {state, ready, join, leave, ask, ai,
// cancel, callTool, guardCap, detokenize, config}.

import { capProblem } from './guards.js'
import { Detokenizer, loadMapFromOrigin } from './detok.js'
import { MeshClient } from './mesh.js'

const $ = sel => document.querySelector(sel)

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag)
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') node.className = v
    else if (k.startsWith('data-')) node.setAttribute(k, v)
    else node[k] = v
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c)
  return node
}

async function loadConfig() {
  let config = {}
  let problem = null
  try {
    const response = await fetch('/config.json', { cache: 'no-store' })
    if (response.ok) config = await response.json()
    else problem = `/config.json answered ${response.status}`
  } catch (err) {
    problem = `could not load /config.json: ${err.message}`
  }
  const q = new URLSearchParams(location.search)
  const relays = q.getAll('relay').flatMap(r => r.split(',')).map(s => s.trim()).filter(Boolean)
  return {
    strategy: q.get('strategy') ?? config.strategy ?? 'mqtt',
    relayUrls: relays.length ? relays : config.relayUrls ?? [],
    appId: q.get('appId') ?? config.appId ?? '',
    roomId: q.get('room') ?? config.roomId ?? '',
    nick: q.get('nick') ?? '',
    iceServers: Array.isArray(config.iceServers) ? config.iceServers : [],
    passwordRequired: Boolean(config.passwordRequired),
    autojoin: q.get('autojoin') !== '0',
    relayGraceMs: Number(q.get('relayGraceMs')) || undefined,
    node: config.node ?? null,
    problem,
  }
}

// ------------------------------------------------------------------ rendering

function fmtLoad(load) {
  if (!load) return '—'
  const busy = load.active || load.queued ? `${load.active} running, ${load.queued} queued` : 'idle'
  return `${busy} (max ${load.max})`
}

function statsLine(s) {
  if (!s) return ''
  const parts = []
  if (s.ttftMs !== null) parts.push(`first token ${Math.round(s.ttftMs)} ms`)
  if (s.tokPerSec !== null) parts.push(`${s.tokPerSec} tok/s`)
  if (s.tokens) parts.push(`${s.tokens} tokens`)
  if (s.bytesPerToken !== null) parts.push(`${s.bytesPerToken} B/token`)
  if (s.finishReason) parts.push(`finish: ${s.finishReason}`)
  return parts.join(' · ')
}

class View {
  constructor(client) {
    this.client = client
    this.messageNodes = new Map()
    this.pending = false
  }

  schedule() {
    if (this.pending) return
    this.pending = true
    requestAnimationFrame(() => {
      this.pending = false
      this.render()
    })
  }

  render() {
    const s = this.client.state
    const relayStates = Object.entries(s.relays)
    $('#status').textContent = s.joined
      ? `${s.strategy} · room “${s.roomId}” · you are ${s.nick} · relay ${relayStates.length ? relayStates.map(([u, st]) => `${u} ${st}`).join(', ') : 'connecting'}`
      : 'not connected'
    $('#status').dataset.state = s.relayProblem ? 'problem' : s.joined ? 'joined' : 'idle'
    $('#join').disabled = s.joined
    $('#leave').disabled = !s.joined
    this.renderPeers(s)
    this.renderMessages(s)
    const running = Object.values(s.calls).some(c => !c.finished)
    $('#stop').disabled = !running
  }

  renderPeers(s) {
    const body = $('#peers tbody')
    const select = $('#target')
    const selected = select.value
    body.replaceChildren()
    const options = [el('option', { value: '', textContent: 'least loaded meshnode' })]
    const peers = Object.values(s.peers).sort((a, b) => a.nick.localeCompare(b.nick))
    for (const p of peers) {
      const availability = !p.capOk ? `invalid cap: ${p.capError}` : p.engine ? (p.available ? 'available' : 'busy') : 'no engine'
      body.append(el('tr', { 'data-peer': p.id },
        el('td', { textContent: p.nick }),
        el('td', { textContent: p.modelId ?? '—', className: 'model' }),
        el('td', { textContent: fmtLoad(p.load) }),
        el('td', { textContent: availability, className: p.available ? 'ok' : 'muted' })))
      if (p.engine) options.push(el('option', { value: p.id, textContent: `${p.nick} (${p.modelId})` }))
    }
    if (!peers.length) {
      body.append(el('tr', {}, el('td', { colSpan: 4, className: 'muted', textContent: s.joined ? 'waiting for peers…' : 'join a room to see peers' })))
    }
    select.replaceChildren(...options)
    select.value = options.some(o => o.value === selected) ? selected : ''
  }

  renderMessages(s) {
    const log = $('#log')
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40
    for (const m of s.messages) {
      let node = this.messageNodes.get(m.id)
      if (!node) {
        const who = m.role === 'user' ? 'you' : m.role === 'error' ? 'error' : m.nick ?? 'peer'
        node = el('li', { class: `msg ${m.role}` },
          el('span', { class: 'who', textContent: who }),
          el('span', { class: 'text' }),
          el('span', { class: 'stats' }))
        if (m.role === 'error') node.setAttribute('role', 'alert')
        this.messageNodes.set(m.id, node)
        log.append(node)
      }
      const text = m.text || (m.done ? '' : '…')
      if (node.children[1].textContent !== text) node.children[1].textContent = text
      const stats = m.role === 'assistant' && m.callId ? s.calls[m.callId] : m.ai ? s.aiStreams.find(a => a.id === m.id) : null
      const line = statsLine(stats)
      if (node.children[2].textContent !== line) node.children[2].textContent = line
      node.classList.toggle('streaming', !m.done)
    }
    if (atBottom) log.scrollTop = log.scrollHeight
  }
}

// ------------------------------------------------------------------ wiring

async function main() {
  const config = await loadConfig()
  let view = null
  const client = new MeshClient({ onChange: () => view?.schedule(), relayGraceMs: config.relayGraceMs })
  view = new View(client)
  client.state.config = config

  $('#strategy').value = config.strategy
  $('#relays').value = config.relayUrls.join('\n')
  $('#appId').value = config.appId
  $('#room').value = config.roomId
  $('#nick').value = config.nick
  if (config.passwordRequired) $('#password-hint').textContent = 'This room has a password: enter it and press Join.'
  if (config.problem) client.error('config', config.problem)

  const formSettings = () => ({
    strategy: $('#strategy').value,
    relayUrls: $('#relays').value.split(/[\s,]+/).filter(Boolean),
    appId: $('#appId').value.trim(),
    roomId: $('#room').value.trim(),
    password: $('#password').value,
    nick: $('#nick').value.trim(),
    iceServers: config.iceServers,
  })

  const join = async (overrides = {}) => {
    const result = await client.join({ ...formSettings(), ...overrides })
    $('#message').focus()
    return result
  }

  $('#room-form').addEventListener('submit', e => {
    e.preventDefault()
    join().catch(err => console.warn('join failed', err))
  })
  $('#leave').addEventListener('click', () => client.leave())

  const send = async () => {
    const input = $('#message')
    const text = input.value.trim()
    if (!text) return
    input.value = ''
    try {
      if (text.startsWith('/ai ') || text === '/ai') await client.ai(text)
      else {
        await client.ask(text, {
          peerId: $('#target').value || null,
          maxTokens: Number($('#max-tokens').value) || 256,
          temperature: Number($('#temperature').value),
          history: $('#history').checked,
        })
      }
    } catch (err) {
      console.warn('send failed', err) // already shown as an error line
    }
  }
  $('#composer').addEventListener('submit', e => {
    e.preventDefault()
    send()
  })
  $('#message').addEventListener('keydown', e => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault()
      send()
    }
  })
  $('#stop').addEventListener('click', () => {
    for (const c of Object.values(client.state.calls)) if (!c.finished) client.cancel(c.callId)
  })

  window.meshClient = {
    get state() { return client.state },
    config,
    client,
    ready: true,
    join,
    leave: () => client.leave(),
    ask: (prompt, opts) => client.ask(prompt, opts),
    ai: text => client.ai(text),
    cancel: callId => client.cancel(callId),
    callTool: (peerId, name, args, timeoutMs) => client.callTool(peerId, name, args, timeoutMs),
    guardCap: cap => {
      const reason = capProblem(cap)
      return { ok: reason === null, reason }
    },
    /** Render id chunks with the map this origin serves (tests compare with Python's detokenizer). */
    detokenize: async (mapId, chunks) => {
      const { tokenMap } = await loadMapFromOrigin(mapId)
      const d = new Detokenizer(tokenMap)
      return chunks.map((ids, i) => d.render(ids, { partial: i < chunks.length - 1 }))
    },
  }
  document.body.dataset.ready = '1'
  view.render()
  if (config.autojoin && !config.passwordRequired && config.relayUrls.length && config.appId && config.roomId) {
    join().catch(err => console.warn('join failed', err))
  }
}

main().catch(err => {
  document.body.dataset.ready = 'error'
  const box = document.querySelector('#fatal')
  box.hidden = false
  box.textContent = `The client failed to start: ${err.message}`
})
