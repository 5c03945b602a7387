"""Speech speed: Hearth over HTTP versus faster-whisper and Piper called in-process, as ratios in one run.

    python benchmarks/speech.py [--threads 2] [--rounds 3]

Real-time factor (processing seconds per second of audio; lower is faster) of transcription with whisper tiny.en
and base, and of speech synthesis with en_US-joe-medium, through the API and in-process (a fresh process of its
own, same threads, same options: beam 5, int8). The audio to transcribe is Piper reading a 1,000-character text
(about a minute). Also: time to the first audio byte for that text over HTTP (streamed as PCM), against the time
for the whole. The rounds alternate; medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import CACHE, ROOT, machine_line, start_hearth, stop

from hearth.gallery.builtin import install

TEXT = ("The lighthouse keeper climbed the spiral stairs every evening, counting each of the one hundred and "
        "twelve steps. At the top he trimmed the wick, polished the great lens and watched the beam sweep across "
        "the dark water. Ships passed far out at sea, their lights no bigger than stars. One night a storm came "
        "in from the west. Rain hammered the glass and the wind howled around the tower. Below, on the rocks, he "
        "saw a small boat struggling against the waves. He ran down the stairs, lit a lantern and waved it from "
        "the doorway until the sailors saw him. They steered into the shelter of the cove and came ashore, cold "
        "and tired but alive. In the morning the sea was calm again, and the keeper made them breakfast of bread, "
        "eggs and strong tea. Before they left, they thanked him and promised to return in summer with news of "
        "the mainland. He waved as they rowed away, then climbed the stairs again. That evening he wrote the storm "
        "into his logbook, with the name of the boat and the hour it reached the cove.")

IN_PROCESS = """
import json, sys, time, io, wave
kind, folder, threads, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = []
if kind == "whisper":
    from faster_whisper import WhisperModel, decode_audio
    model = WhisperModel(folder, device="cpu", cpu_threads=threads, compute_type="int8")
    audio_path = sys.argv[5]
    audio = decode_audio(audio_path)
    seconds = len(audio) / 16000
    for _ in range(rounds):
        started = time.perf_counter()
        segments, _info = model.transcribe(audio_path, beam_size=5)
        text = "".join(s.text for s in segments)
        out.append((time.perf_counter() - started) / seconds)
else:
    from piper import PiperVoice
    voice = PiperVoice.load(folder)
    text = sys.stdin.read()
    for _ in range(rounds):
        started = time.perf_counter()
        samples = sum(len(chunk.audio_int16_bytes) // 2 for chunk in voice.synthesize(text))
        out.append((time.perf_counter() - started) / (samples / voice.config.sample_rate))
print(json.dumps(out))
"""


def in_process(kind: str, path: Path, threads: int, rounds: int, extra: list[str], stdin: str = "") -> list[float]:
    result = subprocess.run([sys.executable, "-c", IN_PROCESS, kind, str(path), str(threads), str(rounds), *extra],
                            input=stdin, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        for name in ("whisper-tiny.en", "whisper-base", "en_US-joe-medium"):
            install(name, models, CACHE)
        process, base = start_hearth(models, args.threads)
        client = httpx.Client(base_url=base, timeout=600)
        try:
            wav = client.post("/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "response_format": "wav"})
            wav.raise_for_status()
            audio_path = models / "story.wav"
            audio_path.write_bytes(wav.content)
            seconds = (len(wav.content) - 44) / 2 / 22050
            results: dict[str, dict[str, list[float]]] = {}
            ttfb: list[tuple[float, float]] = []
            for _ in range(args.rounds):
                for model in ("whisper-tiny.en", "whisper-base"):
                    started = time.perf_counter()
                    response = client.post("/v1/audio/transcriptions", data={"model": model},
                                           files={"file": ("story.wav", wav.content, "audio/wav")})
                    response.raise_for_status()
                    results.setdefault(model, {"api": [], "local": []})["api"].append(
                        (time.perf_counter() - started) / seconds)
                    results[model]["local"] += in_process("whisper", models / model, args.threads, 1,
                                                          [str(audio_path)])
                started = time.perf_counter()
                first = 0.0
                samples = 0
                with client.stream("POST", "/v1/audio/speech", json={"model": "tts-1", "input": TEXT,
                                                                     "response_format": "pcm"}) as response:
                    for chunk in response.iter_raw():
                        first = first or time.perf_counter()
                        samples += len(chunk) // 2
                total = time.perf_counter() - started
                ttfb.append((first - started, total))
                results.setdefault("piper", {"api": [], "local": []})["api"].append(total / (samples / 24000))
                results["piper"]["local"] += in_process("piper", models / "en_US-joe-medium.onnx", args.threads, 1,
                                                        [], stdin=TEXT)
        finally:
            client.close()
            stop(process)

    print(machine_line(threads=args.threads, rounds=args.rounds) + f", audio {seconds:.1f} s ({len(TEXT)} characters)")
    print("| model | in-process real-time factor | Hearth over HTTP real-time factor | speed ratio (in-process / HTTP) |")
    print("|---|---|---|---|")
    for name, label in (("whisper-tiny.en", "faster-whisper tiny.en (transcribe)"),
                        ("whisper-base", "faster-whisper base (transcribe)"),
                        ("piper", "Piper en_US-joe-medium (speak)")):
        local, api = statistics.median(results[name]["local"]), statistics.median(results[name]["api"])
        print(f"| {label} | {local:.3f} | {api:.3f} | {local / api:.2f} |")
    first, whole = statistics.median(t[0] for t in ttfb), statistics.median(t[1] for t in ttfb)
    print(f"\nSpeech of {len(TEXT)} characters over HTTP: first audio byte after {first:.2f} s, all of it after "
          f"{whole:.2f} s.")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
