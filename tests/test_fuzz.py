"""Fuzzing: schemathesis drives every route of /openapi.json against the fake backend, and a hypothesis suite sends
hostile JSON to the OpenAI, Ollama and Anthropic routes. No answer may be a 5xx, and every answer must be one the
document declares (status, media type, body schema).

Sized for `make test` (HEARTH_FUZZ_EXAMPLES per operation, 15 by default); `make fuzz` runs it longer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import HearthServer, write_yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = int(os.environ.get("HEARTH_FUZZ_EXAMPLES", "15"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
# Routes that would change the server under the fuzzer's feet (installs, deletes, loads), or read the network.
SKIPPED = ("/models/apply", "/models/delete", "/models/jobs", "/api/pull", "/api/delete", "/runners/load",
           "/runners/unload")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("fuzz-models")
    write_yaml(models, "fake", {"name": "fake-model", "backend": "fake", "alias": ["gpt-4", "string"],
                                "fake": {"vision": True}})
    server = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield server
    server.stop()


def test_every_route_against_the_document(fuzz_server: HearthServer) -> None:
    """Each operation of the document, with schemathesis' generated requests (valid and invalid by the schema)."""
    api = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    api = api.exclude(path_regex="^(" + "|".join(SKIPPED) + ")")
    failures: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) > 30
    for operation in operations:

        @given(case=st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in schemathesis.GenerationMode)))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=30)

        try:
            run()
        except Exception as exc:  # collected, so one run names every operation that fails
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)


# -- hostile JSON ----------------------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) |
    st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12)
BODIES = {
    "/v1/chat/completions": st.fixed_dictionaries({"model": st.just("fake-model") | TEXT, "messages": HOSTILE},
                                                  optional={"max_tokens": HOSTILE, "stop": HOSTILE, "tools": HOSTILE,
                                                            "response_format": HOSTILE, "temperature": HOSTILE,
                                                            "logit_bias": HOSTILE, "n": HOSTILE}),
    "/v1/completions": st.fixed_dictionaries({"model": st.just("fake-model"), "prompt": HOSTILE},
                                             optional={"max_tokens": HOSTILE, "stop": HOSTILE, "suffix": HOSTILE}),
    "/v1/embeddings": st.fixed_dictionaries({"model": st.just("fake-model"), "input": HOSTILE}),
    "/api/chat": st.fixed_dictionaries({"model": st.just("fake-model"), "messages": HOSTILE},
                                       optional={"options": HOSTILE, "format": HOSTILE, "stream": HOSTILE,
                                                 "think": HOSTILE, "tools": HOSTILE}),
    "/api/generate": st.fixed_dictionaries({"model": st.just("fake-model"), "prompt": HOSTILE},
                                           optional={"options": HOSTILE, "raw": HOSTILE, "images": HOSTILE}),
    "/v1/messages": st.fixed_dictionaries({"model": st.just("fake-model"), "max_tokens": HOSTILE,
                                           "messages": HOSTILE},
                                          optional={"system": HOSTILE, "tools": HOSTILE, "thinking": HOSTILE,
                                                    "tool_choice": HOSTILE}),
}


@pytest.mark.parametrize("route", BODIES)
def test_hostile_json_never_gets_a_server_error(fuzz_server: HearthServer, route: str) -> None:
    with httpx.Client(base_url=fuzz_server.base_url, timeout=30) as client:

        @given(BODIES[route] | HOSTILE)
        @settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True)
        def send(body: object) -> None:
            text = json.dumps(body, ensure_ascii=True, allow_nan=False)  # lone surrogates travel as \\udXXX
            reply = client.post(route, content=text, headers={"content-type": "application/json"})
            assert reply.status_code < 500, (route, text[:300], reply.status_code, reply.text[:300])
            if reply.status_code >= 400:
                error = reply.json()
                assert isinstance(error.get("error"), str if route.startswith("/api/") else dict), error

        send()
    assert "Traceback" not in Path(fuzz_server.log_path).read_text()
