// Guards for inbound Legion payloads (legion-mesh §5.3, §5.4, §5.6), plus size limits.
// Each returns null when the payload is acceptable, else a short reason.

const isObject = v => v !== null && typeof v === 'object' && !Array.isArray(v)
const isStringArray = v => Array.isArray(v) && v.every(s => typeof s === 'string')
const isNumber = v => typeof v === 'number' && Number.isFinite(v)

const LIMITS = { nick: 64, modelId: 256, summary: 1024, tools: 64, skills: 64, skill: 128, text: 16384, callId: 128 }

/** The cap guard of the Legion browsers (§5.3), with size limits. */
export function capProblem(cap) {
  if (!isObject(cap)) return 'cap must be an object'
  if (cap.v !== 1) return 'cap.v must be 1'
  if (!isNumber(cap.ts)) return 'cap.ts must be a number'
  if (typeof cap.nick !== 'string') return 'cap.nick must be a string'
  if (cap.nick.length > LIMITS.nick) return 'cap.nick is too long'
  if (typeof cap.modelId !== 'string') return 'cap.modelId must be a string'
  if (cap.modelId.length > LIMITS.modelId) return 'cap.modelId is too long'
  if (typeof cap.available !== 'boolean') return 'cap.available must be a boolean'
  if (!isStringArray(cap.skills)) return 'cap.skills must be a list of strings'
  if (cap.skills.length > LIMITS.skills || cap.skills.some(s => s.length > LIMITS.skill)) return 'cap.skills is too large'
  if (typeof cap.systemPromptSummary !== 'string') return 'cap.systemPromptSummary must be a string'
  if (cap.systemPromptSummary.length > LIMITS.summary) return 'cap.systemPromptSummary is too long'
  if (!Array.isArray(cap.tools)) return 'cap.tools must be a list'
  if (cap.tools.length > LIMITS.tools) return 'cap.tools is too long'
  for (const [i, tool] of cap.tools.entries()) {
    if (!isObject(tool)) return `cap.tools[${i}] must be an object`
    if (typeof tool.name !== 'string') return `cap.tools[${i}].name must be a string`
    if (typeof tool.description !== 'string') return `cap.tools[${i}].description must be a string`
    if (!isObject(tool.inputSchema)) return `cap.tools[${i}].inputSchema must be an object`
  }
  for (const key of ['authoritative', 'delegating']) {
    if (cap[key] !== undefined && !isStringArray(cap[key])) return `cap.${key} must be a list of strings`
  }
  // stageHost (pipeline split) carries required numeric fields and a stage list; a malformed
  // present block rejects the whole cap. This client does not use it: require the basic shape.
  if (cap.stageHost !== undefined) {
    if (!isObject(cap.stageHost)) return 'cap.stageHost must be an object'
  }
  if (cap.load !== undefined) {
    const load = cap.load
    if (!isObject(load) || !['active', 'queued', 'max'].every(k => Number.isInteger(load[k]) && load[k] >= 0)) {
      return 'cap.load must hold non-negative integers active, queued, max'
    }
  }
  return null
}

/** cm guard (§5.4). */
export function chatProblem(msg) {
  if (!isObject(msg)) return 'cm must be an object'
  if (msg.v !== 1 || !isNumber(msg.ts)) return 'cm needs v=1 and a numeric ts'
  if (typeof msg.to !== 'string') return 'cm.to must be a string'
  if (!['text', 'tokens', 'frame'].includes(msg.bodyKind)) return 'cm.bodyKind is unknown'
  if (msg.bodyKind === 'text' && (typeof msg.text !== 'string' || msg.text.length > LIMITS.text)) {
    return 'cm.text must be a string'
  }
  if (msg.bodyKind === 'tokens' && !(Array.isArray(msg.ids) && msg.ids.every(i => Number.isInteger(i) && i >= 0))) {
    return 'cm.ids must be non-negative integers'
  }
  if (msg.bodyKind === 'frame' && typeof msg.frame !== 'string') return 'cm.frame must be a string'
  if (msg.mapId !== undefined && typeof msg.mapId !== 'string') return 'cm.mapId must be a string'
  if (msg.safety !== undefined && !isObject(msg.safety)) return 'cm.safety must be an object'
  return null
}

/** tc guard (§5.6). */
export function toolFrameProblem(frame) {
  if (!isObject(frame)) return 'tc must be an object'
  if (frame.v !== 1 || !isNumber(frame.ts)) return 'tc needs v=1 and a numeric ts'
  if (typeof frame.callId !== 'string' || !frame.callId || frame.callId.length > LIMITS.callId) return 'tc.callId is invalid'
  if (frame.kind === 'call') {
    if (typeof frame.toolName !== 'string') return 'tc.toolName must be a string'
    if (!isObject(frame.args)) return 'tc.args must be an object'
    return null
  }
  if (frame.kind === 'result') {
    if (!['ok', 'error', 'denied'].includes(frame.status)) return 'tc.status must be ok, error or denied'
    if (frame.result !== undefined && !isObject(frame.result)) return 'tc.result must be an object'
    if (frame.error !== undefined && typeof frame.error !== 'string') return 'tc.error must be a string'
    return null
  }
  return 'tc.kind must be call or result'
}

/** The text of a tool result as Legion consumers read it: content string, content.text, or JSON. */
export function resultText(result) {
  const content = result?.content
  if (typeof content === 'string') return content
  if (isObject(content) && typeof content.text === 'string') return content.text
  return content === undefined ? '' : JSON.stringify(content)
}
