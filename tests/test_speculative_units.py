"""Speculative decoding's parts that need no model: prompt lookup's guesses, the judging of whether guessing pays
(on scripted step times) and the settings read from the YAML.
(Everything else runs on real models in tests/test_speculative.py.)"""

from __future__ import annotations

import random

import pytest

from hearth.backends.llama_scheduler import Balance, Payoff
from hearth.backends.llama_speculative import NgramIndex
from hearth.config.schema import parse_options
from hearth.config.speculation import not_done, speculation_from


def search(tokens: list[int], last: int, n: int, n_max: int, follow: int = -1) -> tuple[list[int], int]:
    """What the index must answer, by brute force, and where from: the tokens at `follow` if the last `n` tokens
    are those before it, else the tokens after the latest earlier run equal to the last `n`."""
    full = [*tokens, last]
    key = full[-n:]
    if n <= follow < len(tokens) and full[follow - n:follow] == key:
        return tokens[follow:follow + n_max], follow
    for start in range(len(full) - n - 1, -1, -1):
        if full[start:start + n] == key:
            return full[start + n:start + n + n_max][:len(tokens) - start - n], start + n
    return [], -1


def test_prompt_lookup_guesses_what_followed_the_last_tokens_before() -> None:
    index = NgramIndex(3)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert index.guess([*prompt, 1, 2], 3, 4) == [4, 5, 6, 7]
    assert NgramIndex(3).guess([*prompt, 9, 9], 9, 4) == []  # 9 9 9 never occurred before


def test_prompt_lookup_goes_on_where_the_text_is_being_copied_from() -> None:
    # "a b c" occurs twice in the prompt, followed by different text; the answer copies the first occurrence
    a, b, c = 1, 2, 3
    prompt = [7, 8, 9, a, b, c, 10, 11, 12, a, b, c, 20, 21]
    index = NgramIndex(3)
    assert index.guess([*prompt, 0, 7, 8], 9, 3) == [a, b, c]  # "7 8 9" occurs once: the copy starts there
    assert index.guess([*prompt, 0, 7, 8, 9, a], b, 3) == [c, 10, 11]  # two guesses kept: goes on there
    assert index.guess([*prompt, 0, 7, 8, 9, a, b], c, 3) == [10, 11, 12]  # not what followed the latest "a b c"
    assert NgramIndex(3).guess([*prompt, 0, 7, 8, 9, a, b], c, 3) == [20, 21, 0]  # which a fresh lookup takes
    assert index.guess([*prompt, 0, 7, 8, 9, a, b, c, 20], 21, 3) == [0, 7, 8]  # left the copy: looked up anew


def test_the_index_answers_as_a_search_would_while_the_sequence_grows_and_is_cut() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 5):
        index = NgramIndex(n)
        tokens = [rng.randrange(6) for _ in range(40)]
        source = at = -1
        for _ in range(300):
            last = rng.randrange(6)
            expected, source = search(tokens, last, n, 8, source + len(tokens) + 1 - at if source >= 0 else -1)
            at = len(tokens) + 1
            assert index.guess(tokens, last, 8) == expected
            if rng.random() < 0.2:  # rejected guesses cut off
                del tokens[len(tokens) - rng.randrange(1, 6):]
                index.cut(len(tokens))
            tokens += [last] + [rng.randrange(6) for _ in range(rng.randrange(3))]


def test_guessing_rests_where_it_costs_and_only_for_that_sequence() -> None:
    payoff = Payoff()
    assert not payoff.allows(1)  # what a plain step costs is not known yet
    for _ in range(Payoff.PLAIN):
        payoff.record(1, [], 0.030, 1)  # 30 ms a token without guesses
    assert payoff.allows(1) and not payoff.allows(2)  # known for one sequence generating, not for two
    prose, edit = Balance(), Balance()
    steps = 0
    while prose.allows():  # prose: 4 guessed, none kept, 120 ms for 1 token: 3 plain steps lost each time
        payoff.record(1, [prose], 0.120, 1)
        steps += 1
    assert steps == 5  # in debt by more than DEBT (12) after 5 such steps
    assert prose.resting == Balance.REST - 1
    for _ in range(Balance.REST - 1):
        assert not prose.allows()
    assert prose.allows()  # rested: tries anew
    payoff.record(1, [edit], 0.480, 49)  # the code edit keeps 48 guesses: 49 tokens for 16 plain steps, +33
    assert edit.balance == Balance.CREDIT
    payoff.record(1, [edit], 0.360, 1)  # a 32-token guess missed at a renamed word: 11 lost, paid for
    assert edit.allows() and edit.resting == 0 and edit.balance == Balance.CREDIT - 11
    while prose.allows():  # the prose runs into debt again before gaining anything: rests twice as long
        payoff.record(1, [prose], 0.120, 1)
    assert prose.resting == 2 * Balance.REST - 1
    for _ in range(2 * Balance.REST - 1):
        assert not prose.allows()
    for seconds, tokens in [(0.12, 1), (0.12, 1), (0.12, 1), (0.3, 33)]:  # one long guess kept pays for 3 missed
        assert prose.allows()
        payoff.record(1, [prose], seconds, tokens)
    assert prose.balance > 0
    for _ in range(Payoff.REFRESH):
        payoff.record(1, [edit], 0.150, 16)
    assert edit.rest == Balance.REST and not payoff.allows(1)  # a plain step now and then keeps its cost known
    payoff.record(1, [], 0.030, 1)
    assert payoff.allows(1)


def test_settings_from_localai_options() -> None:
    assert speculation_from({}, False) is None
    assert speculation_from(parse_options(["spec_type:none"]), True) is None
    mtp = parse_options(["spec_type:draft-mtp", "spec_n_max:3"])  # LocalAI's gallery: llama.cpp's other kinds
    assert speculation_from(mtp, False) is None and "'draft-mtp' speculation is not done here" in not_done(mtp)
    assert not_done(parse_options(["spec_type:ngram-simple"])) == ""
    ngram = speculation_from(parse_options(["spec_type:ngram-simple", "spec_n_max:8", "spec_ngram_size_n:4"]), False)
    assert ngram is not None and (ngram.kind, ngram.n_max, ngram.ngram) == ("ngram-simple", 8, 4)
    draft = speculation_from(parse_options(["spec_p_min:0.75", "spec_n_min:2"]), True)
    assert draft is not None and (draft.kind, draft.p_min, draft.n_min) == ("draft-simple", 0.75, 2)
    assert (draft.n_max, draft.draft_n_max, draft.lookup, draft.drafts) == (6, 6, False, True)
    # llama.cpp's list of kinds (--spec-type a,b): lookup first, the draft where lookup finds nothing; spec_n_max is
    # then the lookup's, and the draft guesses its own 6.
    both = speculation_from(parse_options(["spec_type:draft-simple, ngram-simple", "spec_n_max:32"]), True)
    assert both is not None and (both.kind, both.n_max, both.draft_n_max) == ("ngram-simple,draft-simple", 32, 6)
    assert both.lookup and both.drafts
    mixed = parse_options(["spec_type:ngram-simple,draft-mtp"])  # the kinds Hearth does, and the log says the rest
    assert speculation_from(mixed, False).kind == "ngram-simple"  # type: ignore[union-attr]
    assert "runs with ngram-simple only" in not_done(mixed)


@pytest.mark.parametrize(("options", "has_draft", "message"), [
    (["spec_type:eagle3"], False, "'eagle3' is not a kind of speculation Hearth does"),
    (["spec_type:draft-simple"], False, "draft-simple needs a draft_model"),
    (["spec_type:ngram-simple,draft-simple"], False, "draft-simple needs a draft_model"),
    (["spec_type:none,ngram-simple"], False, "'none' cannot be combined"),
    (["spec_type:ngram-simple", "spec_n_max:1000"], False, "spec_n_max: 1000 is out of range"),
    (["spec_p_min:lots"], True, "spec_p_min: 'lots' is not a number"),
])
def test_settings_refused_with_the_reason(options: list[str], has_draft: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        speculation_from(parse_options(options), has_draft)
