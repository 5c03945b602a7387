"""Speculative decoding's settings, read from a llama-cpp model's YAML: LocalAI's `draft_model` and its `options`
`spec_type` (llama.cpp's `--spec-type` names), `spec_n_max`, `spec_n_min`, `spec_p_min`, and Hearth's
`spec_ngram_size_n` (llama-server's `--spec-ngram-simple-size-n`) and `spec_max_batch`. How guesses are made and
checked: hearth/backends/llama_speculative.py."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("ngram-simple", "draft-simple")
# llama.cpp's other kinds (common/speculative.cpp), which LocalAI's gallery names (draft-mtp and draft-dflash, in 66
# entries): a model naming one loads without speculation, and says so once in the log (`not_done`).
NOT_DONE = ("draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark", "ngram-map-k", "ngram-map-k4v", "ngram-mod",
            "ngram-cache")
OPTIONS = ("spec_type", "spec_n_max", "spec_n_min", "spec_p_min", "spec_ngram_size_n", "spec_max_batch")
# Defaults, chosen by measurement on 2 cores (benchmarks/speculative.py, benchmarks/README.md).
NGRAM_DEFAULTS = {"n_max": 48, "n_min": 1}  # llama.cpp's --spec-ngram-simple-size-m
DRAFT_DEFAULTS = {"n_max": 6, "n_min": 1}
P_MIN = 0.5
NGRAM = 3
MAX_BATCH = 1


@dataclass(frozen=True)
class Speculation:
    """How a model guesses."""

    kind: str  # one of KINDS, or both, comma-separated in llama.cpp's order of preference: lookup, then the draft
    n_max: int  # most tokens guessed for a sequence in one step
    n_min: int  # fewer guessed than this: none are checked
    p_min: float  # a draft model stops guessing where its own top token is less likely than this
    ngram: int  # ngram-simple: how many of the last tokens must match an earlier stretch
    max_batch: int  # guess only while at most this many sequences generate (a fuller batch gains nothing)
    draft_n_max: int  # most tokens the draft model guesses: n_max, or with both kinds the draft's own (n_max is then
    # the lookup's)

    @property
    def lookup(self) -> bool:
        return "ngram-simple" in self.kind.split(",")

    @property
    def drafts(self) -> bool:
        return "draft-simple" in self.kind.split(",")


def speculation_from(options: dict[str, str | bool], has_draft: bool) -> Speculation | None:
    """The settings from a YAML's parsed `options` and whether it names a `draft_model`; None for no speculation.
    ValueError says what is wrong."""
    def number(key: str, kind: type, default: float, low: float, high: float) -> float:
        given = options.get(key)
        if given is None or given is True:
            return default
        try:
            value = kind(given)
        except (TypeError, ValueError):
            raise ValueError(f"options {key}: '{given}' is not a number") from None
        if not low <= value <= high:
            raise ValueError(f"options {key}: {value} is out of range ({low} to {high})")
        return value

    named = [kind.strip() for kind in str(options.get("spec_type") or "").lower().split(",") if kind.strip()]
    if named and all(kind in NOT_DONE for kind in named):
        return None
    named = [kind for kind in named if kind not in NOT_DONE]  # (the log says which were left out: not_done)
    for kind in named:
        if kind not in ("none", *KINDS):
            raise ValueError(f"options spec_type: '{kind}' is not a kind of speculation Hearth does; use "
                             f"{' or '.join(KINDS)}, both comma-separated, or none")
    if "none" in named and len(named) > 1:
        raise ValueError("options spec_type: 'none' cannot be combined with another kind")
    kinds = [kind for kind in KINDS if kind in named] or (["draft-simple"] if has_draft and not named else [])
    if "draft-simple" in kinds and not has_draft:
        raise ValueError("options spec_type: draft-simple needs a draft_model")
    defaults = DRAFT_DEFAULTS if kinds == ["draft-simple"] else NGRAM_DEFAULTS
    n_max = int(number("spec_n_max", int, defaults["n_max"], 1, 64))
    settings = Speculation(kind=",".join(kinds), n_max=n_max,
                           n_min=min(int(number("spec_n_min", int, defaults["n_min"], 0, 64)), n_max),
                           p_min=number("spec_p_min", float, P_MIN, 0.0, 1.0),
                           ngram=int(number("spec_ngram_size_n", int, NGRAM, 1, 64)),
                           max_batch=int(number("spec_max_batch", int, MAX_BATCH, 1, 256)),
                           # With both, spec_n_max is the lookup's (llama.cpp's size-m) and the draft keeps its own.
                           draft_n_max=DRAFT_DEFAULTS["n_max"] if len(kinds) > 1 else n_max)
    return settings if kinds else None  # (the numbers are checked all the same)


def not_done(options: dict[str, str | bool]) -> str:
    """Why the options' speculation is not done ('' when it is, or none is asked for)."""
    kind = next((kind.strip() for kind in str(options.get("spec_type") or "").lower().split(",")
                 if kind.strip() in NOT_DONE), "")
    if not kind:
        return ""
    others = [kind for kind in map(str.strip, str(options.get("spec_type")).lower().split(",")) if kind in KINDS]
    return (f"options spec_type: llama.cpp's '{kind}' speculation is not done here (Hearth does "
            f"{' and '.join(KINDS)}); the model runs " + (f"with {','.join(others)} only" if others
                                                          else "without speculation"))
