"""``/ai`` in chat (legion-mesh §5.7): who answers, and the answer as a stream to the asker.

The responder rule of the real Legion tabs and bridge: ignore other text; a message directed to
this node (``to`` == our id) is always answered; a broadcast one is left to the sender when its
cap says ``available: true`` (its own model runs it), and otherwise answered by exactly one
meshnode, chosen by :func:`~meshnode.legion.roster.elect_ai_responder` among the meshnodes that
have shown they serve (so a forged cap cannot silence the room).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from meshnode.legion.roster import elect_ai_responder
from meshnode.wire import legion

if TYPE_CHECKING:
    from meshnode.legion.service import LegionService

__all__ = ["AiChat"]

logger = logging.getLogger(__name__)


class AiChat:
    """The ``cm`` handler of one service."""

    def __init__(self, service: LegionService) -> None:
        self.service = service

    def should_answer(self, peer_id: str, message: legion.ChatMessage) -> bool:
        service = self.service
        me = service.room.self_id
        if message.to:
            return message.to == me
        if not service.config.answer_broadcast_ai:
            return False
        sender = service.roster.get(peer_id)
        if sender is not None and sender.cap.available:
            return False  # the sender's own model answers it (legion-mesh §5.7 rule 5)
        candidates = service.roster.candidates()
        candidates[me] = legion.parse_cap(service.build_cap())
        chosen = elect_ai_responder(candidates, peer_id)
        if chosen != me:
            logger.debug("/ai from %s left to %s", peer_id, chosen)
            return False
        return True

    async def on_message(self, peer_id: str, payload: Any) -> None:
        message = legion.parse_chat(payload)
        if message.body_kind != "text" or not message.text or not message.text.startswith("/ai "):
            return
        if not self.should_answer(peer_id, message):
            return
        prompt = message.text[4:].strip()
        if prompt.startswith("@"):
            prompt = prompt.split(" ", 1)[1].strip() if " " in prompt else ""
        if not prompt:
            return
        service = self.service
        refusal = service.refuse_new_work(peer_id) or service.budgets.admit_call(peer_id)
        if refusal is not None and not service.strike(peer_id, refusal):
            return
        if refusal is not None or service.draining:
            service.say(peer_id, f"[/ai meshnode error] {refusal or 'shutting down'}")
            return
        default = min(service.config.default_max_tokens, service.config.max_tokens)
        plan = service.deadlines.plan(None, default, service.generations.work_ahead())
        call_id = f"ai-{int(time.time() * 1000):x}-{len(service.calls)}"
        refusal = plan.refusal
        if refusal is None and service.pacing is not None:
            refusal = service.pacing.admit(peer_id, call_id)
        if refusal is not None:
            service.say(peer_id, f"[/ai meshnode error] {refusal}")
            return
        messages = [{"role": "user", "content": prompt}]
        if service.config.system_prompt:
            messages.insert(0, {"role": "system", "content": service.config.system_prompt})
        service.start_call(peer_id, call_id, messages, plan.max_tokens, None, None, reply_tool=False)
