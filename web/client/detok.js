// Tokenizer maps and the streaming detokenizer (legion-mesh §4.3-§4.5), written from the spec.
//
// Detokenizer rules, for each id in stream order:
//   1. an id in [byte_fallback_start, byte_fallback_end] adds the byte (id - start) to the buffer;
//   2. an id missing from the vocab force-flushes the buffer and yields U+FFFD;
//      a special id force-flushes and is skipped (or rendered with renderSpecial);
//   3. byte_level maps: the token's characters go back to bytes through the inverse GPT-2 table
//      and join the buffer; complete UTF-8 sequences are emitted as soon as they are there;
//   4. metaspace / identity maps: the buffer is force-flushed, then the token text is emitted with
//      U+2581 -> space (the leading space is kept).
// render(ids, partial=false) force-decodes leftover bytes at the end (invalid -> U+FFFD).
// The UTF-8 buffer is a streaming TextDecoder: it emits a character once its last byte is in and
// replaces invalid sequences by U+FFFD per maximal subpart.

const REPLACEMENT = '\ufffd'
const METASPACE = '\u2581'

/** Inverse GPT-2 byte->unicode table: Map(char -> byte). */
function unicodeToByteTable() {
  const table = new Map()
  const selfMapped = new Set()
  const ranges = [[33, 126], [161, 172], [174, 255]]
  for (const [lo, hi] of ranges) {
    for (let b = lo; b <= hi; b++) {
      table.set(String.fromCharCode(b), b)
      selfMapped.add(b)
    }
  }
  let shifted = 0
  for (let b = 0; b < 256; b++) {
    if (!selfMapped.has(b)) table.set(String.fromCharCode(256 + shifted++), b)
  }
  return table
}

const UNICODE_TO_BYTE = unicodeToByteTable()
const utf8 = new TextEncoder()

export class MapError extends Error {}

/** Check the fields the detokenizer relies on. */
export function validateMap(doc) {
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) throw new MapError('map must be a JSON object')
  if (doc.vocab === null || typeof doc.vocab !== 'object' || Array.isArray(doc.vocab)) {
    throw new MapError('map.vocab must be an object')
  }
  if (doc.encoder !== undefined && doc.encoder !== null && !['byte_level', 'metaspace'].includes(doc.encoder)) {
    throw new MapError(`unknown map encoder ${JSON.stringify(doc.encoder)}`)
  }
  const start = doc.byte_fallback_start
  const end = doc.byte_fallback_end
  if ((start === undefined) !== (end === undefined)) throw new MapError('byte fallback start/end come together')
  if (start !== undefined && !(Number.isInteger(start) && Number.isInteger(end) && start >= 0 && start <= end)) {
    throw new MapError('byte fallback range must be two ordered non-negative integers')
  }
}

/** The parsed, indexed form of a map document; share it between streams. */
export class TokenMap {
  constructor(doc) {
    validateMap(doc)
    this.id = doc.id ?? null
    this.encoder = doc.encoder ?? null
    this.tokens = new Map()
    for (const [token, id] of Object.entries(doc.vocab)) {
      if (Number.isInteger(id) && id >= 0 && !this.tokens.has(id)) this.tokens.set(id, token)
    }
    this.special = new Set(Object.values(doc.special_tokens ?? {}).filter(Number.isInteger))
    this.fallbackStart = doc.byte_fallback_start ?? -1
    this.fallbackEnd = doc.byte_fallback_end ?? -2
    this.byteCache = new Map()
  }

  tokenBytes(id, token) {
    let bytes = this.byteCache.get(id)
    if (bytes === undefined) {
      const out = []
      for (const char of token) {
        const b = UNICODE_TO_BYTE.get(char)
        if (b === undefined) out.push(...utf8.encode(char))
        else out.push(b)
      }
      bytes = Uint8Array.from(out)
      this.byteCache.set(id, bytes)
    }
    return bytes
  }
}

/** One stream's detokenizer: render(ids, {partial}) returns the text those ids complete. */
export class Detokenizer {
  constructor(tokenMap) {
    this.map = tokenMap
    this.decoder = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true })
  }

  reset() {
    this.decoder = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true })
  }

  flush() {
    return this.decoder.decode() // end of stream: leftover bytes become U+FFFD; decoder resets
  }

  render(ids, { partial = true, renderSpecial = false } = {}) {
    const m = this.map
    let out = ''
    for (const id of ids) {
      if (id >= m.fallbackStart && id <= m.fallbackEnd) {
        out += this.decoder.decode(Uint8Array.of(id - m.fallbackStart), { stream: true })
        continue
      }
      const token = m.tokens.get(id)
      if (token === undefined) {
        out += this.flush() + REPLACEMENT
        continue
      }
      if (m.special.has(id)) {
        out += this.flush()
        if (renderSpecial) out += token
        continue
      }
      if (m.encoder === 'byte_level') {
        out += this.decoder.decode(m.tokenBytes(id, token), { stream: true })
      } else {
        out += this.flush()
        out += m.encoder === 'metaspace' ? token.split(METASPACE).join(' ') : token
      }
    }
    if (!partial) out += this.flush()
    return out
  }
}

// ---------------------------------------------------------------- which map (legion-mesh §4.5)

const FAMILY_PATTERNS = [
  [/^Qwen2/i, 'qwen/qwen2'],
  [/^SmolLM2/i, 'huggingfacetb/smollm2'],
  [/^Hermes-3-Llama-3/i, 'meta-llama/llama-3'],
  [/^Llama-3/i, 'meta-llama/llama-3'],
  [/^Llama-2/i, 'meta-llama/llama-2'],
  [/^gemma-2/i, 'google/gemma-2'],
  [/^gemma/i, 'google/gemma-1'],
  [/^Phi-4/i, 'microsoft/phi-4'],
  [/^Phi-3/i, 'microsoft/phi-3'],
  [/^Mistral-Nemo/i, 'mistralai/mistral-nemo'],
  [/^Mistral/i, 'mistralai/mistral-v3'],
  [/^Mixtral/i, 'mistralai/mixtral'],
  [/^Codestral/i, 'mistralai/codestral'],
  [/^DeepSeek/i, 'deepseek-ai/deepseek-v3'],
  [/^falcon/i, 'tiiuae/falcon'],
  [/^claude/i, 'anthropic/claude-3-text'],
]

/** The map family a Legion browser picks for a modelId (no aliases file). */
export function familyForModelId(modelId) {
  const stripped = String(modelId).replace(/-q\d.*-MLC$/i, '').replace(/-MLC$/i, '')
  const tail = stripped.slice(stripped.lastIndexOf('/') + 1)
  for (const [pattern, family] of FAMILY_PATTERNS) if (pattern.test(tail)) return family
  return 'qwen/qwen2'
}

/** The map id for a peer: meshnode's additive cap.mapId, else the §4.5 resolution. */
export function mapIdForCap(cap) {
  return typeof cap.mapId === 'string' && /^[a-z0-9._/-]+$/.test(cap.mapId) ? cap.mapId : familyForModelId(cap.modelId)
}

// ---------------------------------------------------------------- loading and pinning

export async function sha256Pin(bytes) {
  if (!globalThis.crypto?.subtle) {
    throw new MapError('cannot verify the tokenizer map: WebCrypto needs a secure context (open the page via http://127.0.0.1 or https)')
  }
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes))
  return 'sha256:' + Array.from(digest, b => b.toString(16).padStart(2, '0')).join('')
}

function samePin(a, b) {
  const norm = p => String(p).toLowerCase().replace(/^sha256:/, '')
  return norm(a) === norm(b)
}

/**
 * Fetch a map through the page origin's /.well-known/codec/index.json, verify its sha256 against
 * the index entry (and against `expectedHash`, e.g. cap.mapHash, when given) and parse it.
 * Returns {doc, hash, tokenMap}. Throws MapError when the id is not listed or a hash differs.
 */
export async function loadMapFromOrigin(mapId, { expectedHash = null, base = location.origin, fetchImpl = fetch } = {}) {
  const indexUrl = new URL('/.well-known/codec/index.json', base)
  const indexResponse = await fetchImpl(indexUrl, { cache: 'no-cache' })
  if (!indexResponse.ok) throw new MapError(`map index ${indexUrl} answered ${indexResponse.status}`)
  const index = await indexResponse.json()
  const entry = (Array.isArray(index?.maps) ? index.maps : []).find(m => m && m.id === mapId)
  if (!entry) throw new MapError(`map ${mapId} is not listed in ${indexUrl}`)
  if (typeof entry.hash !== 'string' || !/^sha256:[0-9a-f]{64}$/i.test(entry.hash)) {
    throw new MapError(`map ${mapId} has no sha256 pin in the index`)
  }
  if (expectedHash && !samePin(expectedHash, entry.hash)) {
    throw new MapError(`map ${mapId}: the peer advertises ${expectedHash} but this page serves ${entry.hash}`)
  }
  const url = new URL(entry.url ?? `/.well-known/codec/maps/${mapId}.json`, indexUrl)
  const response = await fetchImpl(url)
  if (!response.ok) throw new MapError(`map ${url} answered ${response.status}`)
  const bytes = new Uint8Array(await response.arrayBuffer())
  const hash = await sha256Pin(bytes)
  if (!samePin(hash, entry.hash)) throw new MapError(`map ${mapId}: file hash ${hash} does not match the pin ${entry.hash}`)
  let doc = JSON.parse(new TextDecoder().decode(bytes))
  if (doc && typeof doc.url === 'string' && doc.vocab === undefined) {
    throw new MapError(`map ${mapId}: pointer documents are not followed here`)
  }
  return { doc, hash, tokenMap: new TokenMap(doc) }
}

/**
 * Verify a map document received over the mesh (meshnode's `codec_map` tool): its pin is the
 * sha256 of JSON.stringify(doc, null, 2) (how meshnode serialises map files).
 */
export async function tokenMapFromDocument(doc, expectedHash) {
  const hash = await sha256Pin(new TextEncoder().encode(JSON.stringify(doc, null, 2)))
  if (expectedHash && !samePin(hash, expectedHash)) {
    throw new MapError(`map document hash ${hash} does not match ${expectedHash}`)
  }
  return { doc, hash, tokenMap: new TokenMap(doc) }
}
