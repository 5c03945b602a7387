"""Prometheus metrics of the server, kept in the API process and served at GET /metrics in the text exposition
format (version 0.0.4): HTTP requests by route, generation tokens and times by model, model loads and runner
crashes, and what is loaded now. Standard library only (the API process imports no inference library)."""

from __future__ import annotations

import math
from collections.abc import Iterable

# Request and load durations, in seconds: from a cached short answer to a long generation or a large model's load.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

Labels = tuple[tuple[str, str], ...]

FAMILIES: dict[str, tuple[str, str]] = {  # name: (type, help)
    "hearth_http_requests_total": ("counter", "HTTP requests answered, by method, route and status code."),
    "hearth_http_request_duration_seconds": (
        "histogram", "Time from a request's arrival to the end of its response body (streams included), by route."),
    "hearth_generations_total": ("counter", "Generations finished (each choice of n counts), by model and finish "
                                            "reason."),
    "hearth_prompt_tokens_total": ("counter", "Prompt tokens of finished generations, by model."),
    "hearth_prompt_cached_tokens_total": ("counter", "Prompt tokens reused from the model's cache, by model."),
    "hearth_completion_tokens_total": ("counter", "Tokens generated, by model."),
    "hearth_prompt_seconds_total": ("counter", "Time spent reading prompts, by model."),
    "hearth_generation_seconds_total": ("counter", "Time spent generating tokens after the first, by model."),
    "hearth_draft_tokens_total": ("counter", "Tokens guessed by speculative decoding, by model."),
    "hearth_draft_tokens_accepted_total": ("counter", "Guessed tokens the model kept, by model."),
    "hearth_model_loads_total": ("counter", "Model loads, by model and result (ok or failed)."),
    "hearth_model_load_duration_seconds": ("histogram", "Time to start a model's runner and load the model."),
    "hearth_runner_crashes_total": ("counter", "Runner processes that died unasked (serving, or between requests), "
                                               "by model."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{key}="{_escape(value)}"' for key, value in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else str(int(value))


class Metrics:
    """Counters and histograms, labelled; gauges are read from the server's state when the metrics are rendered."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[Labels, float]] = {}
        # name: labels: [bucket counts..., sum, count]
        self._histograms: dict[str, dict[Labels, list[float]]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        assert FAMILIES[name][0] == "counter", name
        series = self._counters.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        assert FAMILIES[name][0] == "histogram", name
        series = self._histograms.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        counts = series.get(key)
        if counts is None:
            counts = series[key] = [0.0] * (len(BUCKETS) + 2)
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                counts[i] += 1
        counts[-2] += value
        counts[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (0 when it never counted)."""
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: Iterable[tuple[str, str, list[tuple[dict[str, str], float]]]] = ()) -> str:
        """The exposition text; `gauges` are (name, help, [(labels, value)]) read now."""
        lines: list[str] = []
        for name, (kind, help_text) in FAMILIES.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                for labels, value in sorted(self._counters.get(name, {}).items()):
                    lines.append(f"{name}{_labels(labels)} {_number(value)}")
                continue
            for labels, counts in sorted(self._histograms.get(name, {}).items()):
                for bound, count in [*zip(BUCKETS, counts, strict=False), (math.inf, counts[-1])]:
                    le = 'le="' + _number(bound) + '"'
                    lines.append(f"{name}_bucket{_labels(labels, le)} {_number(count)}")
                lines.append(f"{name}_sum{_labels(labels)} {_number(counts[-2])}")
                lines.append(f"{name}_count{_labels(labels)} {_number(counts[-1])}")
        for name, help_text, samples in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for labels, value in samples:
                lines.append(f"{name}{_labels(tuple(sorted(labels.items())))} {_number(value)}")
        return "\n".join(lines) + "\n"
