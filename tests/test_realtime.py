"""The Realtime API on real models, through the official `openai` client, on the default set's `gpt-realtime`:
Silero VAD cuts the turn, whisper hears it, Qwen2.5-Coder-0.5B answers, Piper speaks the answer; whisper then hears
the spoken answer back. The questions are spoken by a Piper voice without noise (the same audio every run)."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websockets.exceptions
import websockets.sync.client as ws_client

from hearth.gallery.builtin import install
from hearth.realtime.session import wav
from tests.conftest import CACHE_DIR, HearthServer, write_yaml

pytestmark = pytest.mark.real_model

RATE = 24_000


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("realtime-models")
    for name in ("silero-vad", "whisper-tiny.en", "en_US-joe-medium", "qwen2.5-coder-0.5b-instruct", "gpt-realtime"):
        install(name, models, CACHE_DIR)  # gpt-realtime: the default set's pipeline of the other four
    write_yaml(models, "steady", {"name": "steady", "backend": "piper", "noise_scale": 0, "noise_w": 0,
                                  "parameters": {"model": "en_US-joe-medium.onnx"}})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log", "--api-key", "sekrit",
                           env={"HEARTH_REALTIME_MAX_SESSIONS": "2", "HEARTH_REALTIME_IDLE_SECONDS": "60"})
    yield started
    started.stop()


def speech(server: HearthServer, text: str) -> bytes:
    """`text` spoken by Piper as pcm16 at 24 kHz."""
    response = server.http(headers={"Authorization": "Bearer sekrit"}).post(
        "/v1/audio/speech", json={"model": "steady", "input": text, "response_format": "pcm"})
    assert response.status_code == 200, response.text
    return response.content


def silence(seconds: float) -> bytes:
    return bytes(int(RATE * seconds) * 2)


def send_audio(connection: Any, pcm: bytes, chunk_ms: int = 100, real_time: bool = False) -> None:
    """Appends of `chunk_ms` each, at once or as a microphone gives them (`real_time`)."""
    step = RATE * 2 * chunk_ms // 1000
    began = time.monotonic()
    for k, start in enumerate(range(0, len(pcm), step)):
        if real_time:
            time.sleep(max(0.0, began + k * chunk_ms / 1000 - time.monotonic()))
        connection.input_audio_buffer.append(audio=base64.b64encode(pcm[start:start + step]).decode())


def events_until(connection: Any, kind: str, timeout: float = 120.0) -> list[Any]:
    seen = []
    deadline = time.monotonic() + timeout
    for event in connection:
        seen.append(event)
        assert event.type != "error", event
        if event.type == kind:
            return seen
        assert time.monotonic() < deadline, f"no {kind} within {timeout} s: {[e.type for e in seen]}"
    raise AssertionError(f"the connection closed before {kind}")


def test_a_spoken_question_is_heard_answered_and_spoken(server: HearthServer) -> None:
    question = speech(server, "What is the capital of France?")
    client = server.client(api_key="sekrit")
    with client.realtime.connect(model="gpt-realtime") as connection:
        created = next(iter(connection))
        assert created.type == "session.created"
        assert created.session.audio.input.turn_detection.type == "server_vad"
        connection.session.update(session={
            # A whole sentence, greedily: whisper hears a lone "Paris." from the sampled voice as "Harris." at times.
            "type": "realtime", "instructions": "Answer in one full sentence.", "temperature": 0,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                "transcription": {"model": "whisper-1"},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}},
                      "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "alloy"}}})
        send_audio(connection, silence(0.6) + question + silence(1.5))
        seen = events_until(connection, "response.done")
    kinds = [event.type for event in seen]
    for kind in ("session.updated", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
                 "response.created", "response.output_audio_transcript.delta", "response.output_audio.delta",
                 "response.output_audio_transcript.done"):
        assert kind in kinds, (kind, kinds)
    started = next(e for e in seen if e.type == "input_audio_buffer.speech_started")
    assert 400 <= started.audio_start_ms <= 900  # the question starts 600 ms in
    heard = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert {"capital", "france"} <= set(words(heard.transcript)), heard.transcript
    answer = next(e for e in seen if e.type == "response.output_audio_transcript.done").transcript
    assert "paris" in words(answer), answer
    done = seen[-1].response
    assert done.status == "completed" and done.usage.output_tokens > 0
    # The first audio leaves before the answer's text is complete (sentence by sentence), and it says the answer.
    audio = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta")
    assert len(audio) > RATE  # more than half a second
    result = client.audio.transcriptions.create(model="whisper-tiny.en", file=("answer.wav", wav(audio)))
    assert "paris" in words(result.text), (result.text, answer)


def test_a_pause_inside_a_sentence_does_not_end_the_turn(server: HearthServer) -> None:
    """Whisper starts hearing the turn at the first short silence; speech that goes on drops that guess."""
    client = server.client(api_key="sekrit")
    with client.realtime.connect(model="gpt-realtime") as connection:
        connection.session.update(session={"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 8,
                                           "audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                                  "silence_duration_ms": 900}}}})
        send_audio(connection, silence(0.3) + speech(server, "What is the capital") + silence(0.3)
                   + speech(server, "of France?") + silence(1.0), real_time=True)
        seen = events_until(connection, "response.done")
    assert [e.type for e in seen].count("input_audio_buffer.committed") == 1
    heard = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert {"capital", "france"} <= set(words(heard.transcript)), heard.transcript


def g711(pcm_24k: bytes, codec: str) -> bytes:
    """pcm16 at 24 kHz as G.711 at 8 kHz, by FFmpeg (PyAV): the test's encoder is not the server's."""
    import av
    import numpy as np

    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    encoder = av.CodecContext.create(codec, "w")
    encoder.sample_rate, encoder.layout, encoder.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm_24k, dtype=np.int16).reshape(1, -1), format="s16",
                                       layout="mono")
    frame.sample_rate = RATE
    frames = resampler.resample(frame) + resampler.resample(None)
    return b"".join(bytes(p) for f in frames for p in encoder.encode(f))


def from_g711(data: bytes, codec: str) -> bytes:
    """G.711 at 8 kHz as pcm16, by FFmpeg."""
    import av

    decoder = av.CodecContext.create(codec, "r")
    decoder.sample_rate, decoder.layout = 8000, "mono"
    return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in decoder.decode(av.Packet(data)))


def test_telephone_audio_in_mu_law_and_out_in_a_law(server: HearthServer) -> None:
    """G.711 as a phone line carries it: the question in mu-law, the answer in A-law, both at 8 kHz."""
    question = g711(silence(0.3) + speech(server, "What is the capital of France?") + silence(1.0), "pcm_mulaw")
    client = server.client(api_key="sekrit")
    with client.realtime.connect(model="gpt-realtime") as connection:
        connection.session.update(session={"type": "realtime", "max_output_tokens": 24, "temperature": 0,
                                           "instructions": "Answer in one full sentence.", "audio": {
            "input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcma"}}}})
        updated = events_until(connection, "session.updated")[-1].session
        assert (updated.audio.input.format.type, updated.audio.output.format.type) == ("audio/pcmu", "audio/pcma")
        for start in range(0, len(question), 800):  # 100 ms at 8 kHz, one byte a sample
            connection.input_audio_buffer.append(audio=base64.b64encode(question[start:start + 800]).decode())
        seen = events_until(connection, "response.done")
    heard = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert {"capital", "france"} <= set(words(heard.transcript)), heard.transcript
    stopped = next(e for e in seen if e.type == "input_audio_buffer.speech_stopped")
    assert 1500 < stopped.audio_end_ms < 3500, stopped  # counted in the input's own rate
    answer = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta")
    spoken = from_g711(answer, "pcm_alaw")
    assert len(spoken) == 2 * len(answer)  # one byte a sample, 8 kHz
    result = client.audio.transcriptions.create(model="whisper-tiny.en", file=("answer.wav", wav(spoken, 8000)))
    said = next(e for e in seen if e.type == "response.output_audio_transcript.done").transcript
    assert "paris" in words(said) and "paris" in words(result.text), (said, result.text)


def test_transcription_sessions_caption_each_turn_and_never_answer(server: HearthServer) -> None:
    """`intent=transcription` (no model: the default pipeline's parts): VAD-cut turns, each transcribed, no
    responses; the beta's transcription_session.update is answered in its own name."""
    url = server.base_url.replace("http", "ws") + "/v1/realtime?intent=transcription"
    audio = (silence(0.3) + speech(server, "The weather is sunny today.") + silence(1.0)
             + speech(server, "Tomorrow it will rain.") + silence(1.0))
    with ws_client.connect(url, additional_headers={"Authorization": "Bearer sekrit"}, max_size=None) as socket:
        created = json.loads(socket.recv(timeout=30))
        assert created["type"] == "session.created" and created["session"]["type"] == "transcription", created
        socket.send(json.dumps({"type": "transcription_session.update", "session": {
            "input_audio_transcription": {"model": "whisper-tiny.en", "language": "en"}}}))
        updated = json.loads(socket.recv(timeout=30))
        assert updated["type"] == "transcription_session.updated", updated
        assert updated["session"]["audio"]["input"]["transcription"]["model"] == "whisper-tiny.en"
        socket.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "transcription": {"model": "en_US-joe-medium"}}}}}))  # a voice does not transcribe
        refused = json.loads(socket.recv(timeout=30))
        assert refused["type"] == "error" and refused["error"]["param"] == "session.audio.input.transcription.model"
        socket.send(json.dumps({"type": "response.create"}))
        assert json.loads(socket.recv(timeout=30))["type"] == "error"
        for start in range(0, len(audio), 4800):
            socket.send(json.dumps({"type": "input_audio_buffer.append",
                                    "audio": base64.b64encode(audio[start:start + 4800]).decode()}))
        seen: list[dict[str, Any]] = []
        while sum(e["type"] == "conversation.item.input_audio_transcription.completed" for e in seen) < 2:
            seen.append(json.loads(socket.recv(timeout=60)))
            assert seen[-1]["type"] != "error", (seen[-1], [e["type"] for e in seen])
    kinds = [e["type"] for e in seen]
    assert kinds.count("input_audio_buffer.committed") == 2 and not any(k.startswith("response.") for k in kinds)
    first, second = (e["transcript"] for e in seen if e["type"].endswith("transcription.completed"))
    assert {"weather", "sunny"} <= set(words(first)) and {"tomorrow", "rain"} <= set(words(second)), (first, second)


def test_text_turns_and_tool_calls(server: HearthServer) -> None:
    """A text turn (conversation.item.create + response.create) with a tool: the call's arguments stream, its
    result goes in as a function_call_output item, and the next response uses it."""
    client = server.client(api_key="sekrit")
    tool = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    with client.realtime.connect(model="gpt-realtime") as connection:
        connection.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [tool],
                                           "tool_choice": "required", "temperature": 0,
                                           "audio": {"input": {"turn_detection": None}}})
        connection.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the weather in Paris?"}]})
        connection.response.create()
        seen = events_until(connection, "response.done")
        call = next(e for e in seen if e.type == "response.function_call_arguments.done")
        assert call.name == "get_weather" and json.loads(call.arguments)["city"].lower() == "paris"
        # The call is announced as it starts and its arguments stream, as in chat completions.
        kinds = [e.type for e in seen]
        deltas = [e.delta for e in seen if e.type == "response.function_call_arguments.delta"]
        assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta")
        assert len(deltas) > 1 and json.loads("".join(deltas)) == json.loads(call.arguments), deltas
        connection.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                  "output": json.dumps({"weather": "sunny, 31 degrees"})})
        connection.session.update(session={"type": "realtime", "tool_choice": "none"})
        connection.response.create()
        seen = events_until(connection, "response.done")
    text = next(e for e in seen if e.type == "response.output_text.done").text
    assert "sunny" in text.lower() or "31" in text, text


def test_bad_events_get_error_events_and_the_session_goes_on(server: HearthServer) -> None:
    url = server.base_url.replace("http", "ws") + "/v1/realtime?model=gpt-realtime"
    with ws_client.connect(url, additional_headers={"Authorization": "Bearer sekrit"}) as socket:
        assert json.loads(socket.recv(timeout=30))["type"] == "session.created"
        for bad, code in (("not json", "invalid_event"), ('{"type": "nope"}', "invalid_event"),
                          ('{"type": "input_audio_buffer.append", "audio": "%%%"}', "invalid_request_error"),
                          ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty"),
                          ('{"type": "session.update", "session": {"audio": {"input": {"format": '
                           '{"type": "audio/mpeg"}}}}}', "invalid_request_error"),
                          ('{"type": "session.update", "session": {"audio": {"output": {"format": '
                           '{"type": "audio/pcm", "rate": 16000}}}}}', "invalid_request_error"),
                          ('{"type": "conversation.item.delete", "item_id": "x"}', "item_not_found"),
                          ('{"type": "response.cancel"}', "response_cancel_not_active"),
                          ('{"type": "session.update", "session": {"output_modalities": [{}]}}',
                           "invalid_request_error"),
                          ('{"type": "session.update", "session": {"tool_choice": {"x": 1}}}', "invalid_request_error"),
                          ('{"type": "response.create", "response": {"temperature": "hot"}}', "invalid_request_error"),
                          ('{"type": "response.create", "response": {"output_modalities": "x"}}',
                           "invalid_request_error")):
            socket.send(bad)
            event = json.loads(socket.recv(timeout=30))
            assert event["type"] == "error" and event["error"]["code"] == code, (bad, event)
        socket.send('{"type": "session.update", "session": {"instructions": "Be brief."}}')
        assert json.loads(socket.recv(timeout=30))["session"]["instructions"] == "Be brief."


def test_handshake_needs_the_key_and_a_realtime_model(server: HearthServer) -> None:
    url = server.base_url.replace("http", "ws") + "/v1/realtime?model=gpt-realtime"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        ws_client.connect(url)
    assert refused.value.response.status_code == 403
    # A browser's way: the key in OpenAI's subprotocol.
    with ws_client.connect(url, subprotocols=["realtime", "openai-insecure-api-key.sekrit"]) as socket:
        assert json.loads(socket.recv(timeout=30))["type"] == "session.created"
    for model, code in (("steady", "model_not_found"), ("nope", "model_not_found"), ("", "missing_model")):
        with ws_client.connect(url.replace("gpt-realtime", model),
                               additional_headers={"Authorization": "Bearer sekrit"}) as socket:
            event = json.loads(socket.recv(timeout=30))
            assert event["type"] == "error" and event["error"]["code"] == code, event
    # Only realtime_max_sessions (2) at once.
    headers = {"Authorization": "Bearer sekrit"}
    with ws_client.connect(url, additional_headers=headers) as one, ws_client.connect(url, additional_headers=headers) as two:
        assert json.loads(one.recv(timeout=30))["type"] == json.loads(two.recv(timeout=30))["type"] == "session.created"
        with ws_client.connect(url, additional_headers=headers) as three:
            assert json.loads(three.recv(timeout=30))["error"]["code"] == "session_limit"
    # Loading a pipeline (the web page's Load button, or --preload) loads its parts.
    loaded = server.http(headers=headers).post("/runners/load", json={"model": "gpt-realtime"})
    assert loaded.status_code == 200, loaded.text
    assert [part["name"] for part in loaded.json()["parts"]] == ["silero-vad", "whisper-tiny.en",
                                                                  "qwen2.5-coder-0.5b-instruct", "en_US-joe-medium"]
    states = {m["name"]: m for m in server.http(headers=headers).get("/runners/models").json()["models"]}
    assert (states["gpt-realtime"]["backend"], states["gpt-realtime"]["state"]) == ("pipeline", "idle")
    assert states["gpt-realtime"]["usecases"] == ["realtime"]
    # A pipeline model is not a chat model.
    response = server.client(api_key="sekrit").chat.completions.with_raw_response
    with pytest.raises(Exception) as refused_chat:
        response.create(model="gpt-realtime", messages=[{"role": "user", "content": "hi"}])
    assert getattr(refused_chat.value, "status_code", None) == 400


def test_speech_during_a_reply_cancels_and_truncates_it(server: HearthServer) -> None:
    client = server.client(api_key="sekrit")
    with client.realtime.connect(model="gpt-realtime") as connection:
        # Greedy: the story is long every time (sampled, it was once over before the interruption was heard).
        connection.session.update(session={"type": "realtime", "instructions": "Tell long, detailed stories.",
                                           "temperature": 0})
        send_audio(connection, silence(0.5) + speech(server, "Tell me a long story about a dragon.") + silence(1.2))
        seen = events_until(connection, "response.output_audio.delta")
        send_audio(connection, speech(server, "Wait, stop please.") + silence(1.2))
        seen += events_until(connection, "response.done")
        first = seen[-1].response
        assert first.status == "cancelled", first.status
        said = "".join(e.delta for e in seen if e.type == "response.output_audio_transcript.delta")
        (item_id,) = {e.item_id for e in seen if e.type == "response.output_audio_transcript.delta"}
        # The interruption was heard as the next turn, and answered (that answer is cancelled: a story is long).
        after = events_until(connection, "response.created")
        heard = next(e for e in after if e.type == "conversation.item.input_audio_transcription.completed")
        assert "stop" in words(heard.transcript), heard.transcript
        connection.response.cancel()
        assert events_until(connection, "response.done")[-1].response.status == "cancelled"
        connection.conversation.item.retrieve(item_id=item_id)
        retrieved = events_until(connection, "conversation.item.retrieved")[-1].item
    kept = retrieved.content[0].transcript
    assert retrieved.status == "incomplete" and kept and len(kept) <= len(said), (kept, said)
    assert said.startswith(kept.split(" ")[0])


def test_idle_sessions_close_but_not_while_a_reply_is_running(tmp_path: Any) -> None:
    """Idle means nothing to do: a reply longer than the idle limit runs to its end, then the session closes."""
    write_yaml(tmp_path, "slow", {"name": "slow", "backend": "fake", "fake": {"reply": "word " * 40, "token_delay": 0.05}})
    write_yaml(tmp_path, "typist", {"name": "typist", "pipeline": {"llm": "slow"}})
    server = HearthServer(tmp_path, tmp_path / "hearth.log", env={"HEARTH_REALTIME_IDLE_SECONDS": "1"})
    try:
        with server.client().realtime.connect(model="typist") as connection:
            connection.session.update(session={"type": "realtime", "output_modalities": ["text"], "temperature": 0})
            connection.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Type."}]})
            connection.response.create()
            done = events_until(connection, "response.done")[-1].response
            assert done.status == "completed" and done.usage.output_tokens == 40
            started = time.monotonic()
            closed = next(iter(connection))
            assert closed.type == "error" and closed.error.code == "session_idle", closed
            assert time.monotonic() - started < 10
    finally:
        server.stop()
