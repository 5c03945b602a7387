"""Realtime voice latency: from the end of the user's speech to the first audio of the answer, on the default models.

    python benchmarks/realtime.py [--threads 2] [--rounds 2] [--transcription whisper-base] [-v]

A client streams a spoken question (Piper's joe reading it, pcm16 at 24 kHz) into `/v1/realtime?model=gpt-realtime`
in real time, 100 ms at a time, as a microphone would, and goes on sending silence after it. Server VAD (Silero)
ends the turn, whisper hears it, Qwen2.5-Coder-0.5B answers and Piper speaks the answer sentence by sentence.
Measured from the moment the last chunk holding speech was sent:
- speech_stopped: server VAD decided the turn ended (it waits for `silence_duration_ms` of silence first);
- transcribed: the transcript of the turn is complete;
- first text: the first word of the answer;
- first audio: the first `response.output_audio.delta` (the figure the target is for: median under 1.0 s).
Then the real-time factor of each stage on its own (seconds of work per second of audio; lower is faster), from
the stage's own route: VAD and transcription of the question, the LLM's answer (time to write it against the time
it takes to say it), and speech of the answer.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import websockets.sync.client as ws_client
from common import CACHE, ROOT, machine_line, start_hearth, stop

from hearth.gallery.builtin import BUILTIN, DEFAULT_MODELS, install
from hearth.realtime.session import wav

RATE = 24_000
PIPELINE = BUILTIN["gpt-realtime"].config["pipeline"]
CHUNK = RATE * 2 // 10  # 100 ms of pcm16
QUESTIONS = ["What is the capital of France?", "How many days are in a week?", "What colour is the sky?",
             "Name a large animal that lives in the sea.", "What do bees make?"]
VERBOSE = False
MARKS = ("input_audio_buffer.speech_stopped", "conversation.item.input_audio_transcription.completed",
         "response.output_audio_transcript.delta", "response.output_audio.delta")


def turn(base: str, question: bytes, lead: float = 0.5) -> dict[str, float]:
    """One spoken turn in a fresh session; seconds from the end of speech to each mark."""
    url = base.replace("http", "ws") + "/v1/realtime?model=gpt-realtime"
    audio = bytes(int(RATE * lead) * 2) + question
    seen: dict[str, float] = {}
    done = threading.Event()
    ended = [0.0]
    said: list[str] = []

    with ws_client.connect(url, max_size=None) as socket:
        assert json.loads(socket.recv(timeout=60))["type"] == "session.created"

        def speak() -> None:
            """Real time: chunk k leaves at start + k * 100 ms; silence follows the question until the answer."""
            start = time.monotonic()
            k = 0
            while not done.is_set() and k < 300:
                chunk = audio[k * CHUNK:(k + 1) * CHUNK]
                pad = bytes(CHUNK - len(chunk))
                time.sleep(max(0.0, start + k * 0.1 - time.monotonic()))
                socket.send(json.dumps({"type": "input_audio_buffer.append",
                                        "audio": base64.b64encode(chunk + pad).decode()}))
                if chunk and (k + 1) * CHUNK >= len(audio):
                    ended[0] = time.monotonic()  # the chunk with the last of the speech has left
                k += 1

        sender = threading.Thread(target=speak, daemon=True)
        sender.start()
        try:
            while True:
                event = json.loads(socket.recv(timeout=120))
                kind = event["type"]
                if kind == "error":
                    raise SystemExit(f"error event: {event}")
                if kind in MARKS and kind not in seen:
                    seen[kind] = time.monotonic()
                if kind == "response.output_audio_transcript.delta":
                    said.append(event["delta"])
                if kind == "response.output_audio.delta":
                    break
        finally:
            done.set()
            sender.join()
    if VERBOSE:
        print(f"{seen[MARKS[3]] - seen[MARKS[2]]:.2f} s from the first text to the first audio: {''.join(said)!r}")
    return {kind: at - ended[0] for kind, at in seen.items()}


def stages(client: httpx.Client, question_24k: bytes, transcription: str) -> dict[str, float]:
    """The real-time factor of each stage through its own route."""
    pcm = np.frombuffer(question_24k, dtype=np.int16).astype(np.float32) / 32768
    speech_seconds = len(pcm) / RATE
    out: dict[str, float] = {}
    sixteen = np.interp(np.arange(0, len(pcm), RATE / 16_000), np.arange(len(pcm)), pcm).astype(np.float32)
    started = time.perf_counter()
    client.post("/v1/vad", json={"model": "silero-vad", "audio": sixteen.tolist()}).raise_for_status()
    out["vad"] = (time.perf_counter() - started) / speech_seconds
    wav_file = wav(question_24k)
    started = time.perf_counter()
    heard = client.post("/v1/audio/transcriptions", data={"model": transcription},
                        files={"file": ("q.wav", wav_file, "audio/wav")})
    heard.raise_for_status()
    out["transcription"] = (time.perf_counter() - started) / speech_seconds
    started = time.perf_counter()
    answer = client.post("/v1/chat/completions", json={"model": "qwen2.5-coder-0.5b-instruct", "max_tokens": 80,
                                                       "messages": [{"role": "user", "content": heard.json()["text"]}]})
    answer.raise_for_status()
    writing = time.perf_counter() - started
    text = answer.json()["choices"][0]["message"]["content"]
    started = time.perf_counter()
    spoken = client.post("/v1/audio/speech", json={"model": "tts-1", "input": text, "response_format": "pcm"})
    assert spoken.status_code == 200, (spoken.text, text)
    speaking = time.perf_counter() - started
    answer_seconds = len(spoken.content) / 2 / RATE
    out["llm"] = writing / answer_seconds
    out["tts"] = speaking / answer_seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="each question is asked this many times")
    parser.add_argument("--transcription", default=PIPELINE["transcription"],
                        help=f"the pipeline's transcription model (gpt-realtime's is {PIPELINE['transcription']})")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each answer's first words")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        for name in {*DEFAULT_MODELS, args.transcription}:
            install(name, models, CACHE)
        if args.transcription != PIPELINE["transcription"]:
            path = models / "gpt-realtime.yaml"
            path.write_text(path.read_text().replace(f"transcription: {PIPELINE['transcription']}",
                                                     f"transcription: {args.transcription}"))
        process, base = start_hearth(models, args.threads)
        client = httpx.Client(base_url=base, timeout=600)
        try:
            spoken = {}
            for question in QUESTIONS:
                response = client.post("/v1/audio/speech", json={"model": "tts-1", "input": question,
                                                                 "response_format": "pcm"})
                response.raise_for_status()
                spoken[question] = response.content
            turn(base, spoken[QUESTIONS[0]])  # loads every model of the pipeline
            marks: list[dict[str, float]] = []
            rtf: list[dict[str, float]] = []
            for _ in range(args.rounds):
                for question in QUESTIONS:
                    marks.append(turn(base, spoken[question]))
                    rtf.append(stages(client, spoken[question], args.transcription))
        finally:
            client.close()
            stop(process)

    print(machine_line(threads=args.threads, rounds=args.rounds, transcription=args.transcription)
          + f", {len(marks)} turns, server VAD silence 500 ms")
    print("| from the end of speech to | median s | min s | max s |")
    print("|---|---|---|---|")
    for kind, label in zip(MARKS, ("speech_stopped (VAD)", "transcript complete", "first text of the answer",
                                   "**first audio delta**"), strict=True):
        values = [m[kind] for m in marks if kind in m]
        print(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print("\n| stage | median real-time factor |")
    print("|---|---|")
    for stage, label in (("vad", "Silero VAD (the question)"), ("transcription", f"{args.transcription} (the question)"),
                         ("llm", "Qwen2.5-Coder-0.5B (writing the answer / saying it)"),
                         ("tts", "Piper joe (the answer)")):
        print(f"| {label} | {statistics.median(r[stage] for r in rtf):.3f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
