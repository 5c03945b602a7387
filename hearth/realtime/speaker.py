"""An answer's voice in a realtime session: the LLM's text in as it is written, cut into what can be spoken now
(the first words at a clause break, then sentence by sentence), each piece spoken by the pipeline's TTS model and
sent as audio deltas as soon as it is."""

from __future__ import annotations

import asyncio
import base64
import re
from typing import TYPE_CHECKING, Any

from hearth.runner import hearth_pb2 as pb

if TYPE_CHECKING:
    from hearth.realtime.session import Session

# A sentence ends at . ! ? or a line break, followed by space: the voice gets it while the rest is written.
SENTENCE_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+|\n+")  # (and the CJK full stops)
# The first words are spoken at the first clause break (, ; :) once there are FIRST_CLAUSE_WORDS of them: the answer
# starts to sound sooner, and a clause reads naturally on its own.
CLAUSE_END = re.compile(r"(?<=[,;:\u3001\uff0c])\s+")
FIRST_CLAUSE_WORDS = 3
# A long first sentence with no such break is spoken up to the word that opens its next clause (English), once it
# has FIRST_PHRASE_WORDS words before it: "Bees are insects that ..." starts to sound before its end is written.
CLAUSE_OPENER = re.compile(r"\s+(?=(?:and|but|or|so|that|which|who|because|when|where|while|although)\s)",
                           re.IGNORECASE)
FIRST_PHRASE_WORDS = 6


class Speaker:
    """An answer's voice: sentences in as the text is written, audio deltas out as each is spoken."""

    def __init__(self, session: Session, response_id: str, item: dict[str, Any]) -> None:
        self.session, self.response_id, self.item = session, response_id, item
        self.pending = ""
        self.queued = 0
        self.sentences: asyncio.Queue[str | None] = asyncio.Queue()
        self.sent_bytes = 0
        self.format = session.output_format
        self.spoken = session.spoken.setdefault(item["id"], [])
        self.task = asyncio.create_task(self._speak())

    def add(self, text: str) -> None:
        ready, self.pending = phrases(self.pending + text, first=not self.queued)
        for sentence in ready:
            self._queue(sentence)

    def _queue(self, sentence: str) -> None:
        if sentence.strip():
            self.sentences.put_nowait(sentence.strip())
            self.queued += 1

    async def finish(self) -> None:
        self._queue(self.pending)
        self.sentences.put_nowait(None)
        await self.task

    def stop(self) -> None:
        self.task.cancel()

    def played_ms(self) -> int:
        return self.format.ms(self.sent_bytes)

    async def _speak(self) -> None:
        session = self.session
        config = session.engine.model(session.pipeline.tts or "")
        ids = {"response_id": self.response_id, "item_id": self.item["id"], "output_index": 0, "content_index": 0}
        while (sentence := await self.sentences.get()) is not None:
            self.spoken.append((sentence, self.played_ms()))
            request = pb.SpeakRequest(text=sentence, voice=session.voice, speed=1.0,
                                      response_format=self.format.speech_format)
            async with session.engine.runner(config, "speak") as runner:
                async for reply in runner.stream("speak", request):
                    if reply.audio:
                        self.sent_bytes += len(reply.audio)
                        await session.send({"type": "response.output_audio.delta", **ids,
                                            "delta": base64.b64encode(reply.audio).decode()})


def phrases(text: str, first: bool) -> tuple[list[str], str]:
    """What of an answer being written can be spoken now (whole sentences; with `first`, the start of the first one
    at a clause break), and the rest."""
    *ready, rest = SENTENCE_END.split(text)
    if first and not any(r.strip() for r in ready):
        for pattern, words in ((CLAUSE_END, FIRST_CLAUSE_WORDS), (CLAUSE_OPENER, FIRST_PHRASE_WORDS)):
            for cut in pattern.finditer(rest):
                if len(rest[:cut.start()].split()) >= words:
                    return [rest[:cut.start()]], rest[cut.end():]
    return ready, rest
