// Codec frames and mesh envelopes on the `cf` action (legion-mesh §2.2, §5.5).
//
// A `cf` payload is either a bare Codec msgpack frame {ids, done, finish_reason?} or an envelope
// {k, s, n, b}: HELLO=0, READY=1, DATA=2 (b = msgpack bin holding one frame), END=3.
// Receivers try the envelope first, then a bare frame. finish_reason may be nil (JS encoders).

import { decode, encode } from '@msgpack/msgpack'

export const HELLO = 0
export const READY = 1
export const DATA = 2
export const END = 3

const MAX_UINT32 = 0xffffffff
const MAX_IDS = 16384

export class CodecError extends Error {}

function checkFrame(obj) {
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) throw new CodecError('frame is not a map')
  const { ids, done } = obj
  if (!Array.isArray(ids) || ids.length > MAX_IDS) throw new CodecError('frame.ids must be an array')
  for (const id of ids) {
    if (!Number.isInteger(id) || id < 0 || id > MAX_UINT32) throw new CodecError(`bad token id ${id}`)
  }
  if (typeof done !== 'boolean') throw new CodecError('frame.done must be a boolean')
  const reason = obj.finish_reason
  if (reason !== undefined && reason !== null && typeof reason !== 'string') {
    throw new CodecError('frame.finish_reason must be a string or nil')
  }
  return { ids, done, finishReason: reason ?? null }
}

function looksLikeEnvelope(obj) {
  return obj !== null && typeof obj === 'object' && !Array.isArray(obj) &&
    [HELLO, READY, DATA, END].includes(obj.k) && typeof obj.s === 'string' && typeof obj.n === 'number'
}

/** Decode one Codec frame from bytes. */
export function decodeFrame(bytes) {
  let obj
  try {
    obj = decode(bytes)
  } catch (err) {
    throw new CodecError(`frame is not msgpack: ${err.message}`)
  }
  return checkFrame(obj)
}

/**
 * Decode a `cf` payload: {type: 'envelope', kind, stream, seq, body} or {type: 'frame', frame}.
 * For DATA envelopes `body` is the inner frame's bytes (Uint8Array).
 */
export function decodeCf(bytes) {
  let obj
  try {
    obj = decode(bytes)
  } catch (err) {
    throw new CodecError(`cf payload is not msgpack: ${err.message}`)
  }
  if (looksLikeEnvelope(obj)) {
    if (obj.k === DATA && !(obj.b instanceof Uint8Array)) throw new CodecError('DATA envelope body must be bin')
    return { type: 'envelope', kind: obj.k, stream: obj.s, seq: obj.n, body: obj.b }
  }
  return { type: 'frame', frame: checkFrame(obj) }
}

export function encodeEnvelope(kind, stream, seq, body) {
  return encode({ k: kind, s: stream, n: seq, b: body }, { ignoreUndefined: true })
}

/** HELLO opening a stream whose id is the tc callId; the mesh client only takes identity. */
export function helloEnvelope(stream, mapId) {
  const body = { codec_version: 1, accept_compression: ['identity'], accept_safety_policies: [], intent: 'chat' }
  if (mapId) body.map_id = mapId
  return encodeEnvelope(HELLO, stream, 0, body)
}

/** END with finish_reason "cancel": asks the responder to stop generating (meshnode extension). */
export function cancelEnvelope(stream, seq = 1) {
  return encodeEnvelope(END, stream, seq, { codec_version: 1, finish_reason: 'cancel' })
}
