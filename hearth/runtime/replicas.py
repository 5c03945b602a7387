"""Which replica of a model serves a request (on a Ray cluster, `replicas:` runs several copies of a model).

The least busy one, unless another served a prompt that began the same way lately: its prompt cache likely holds that
start, which the request then need not read again. A prompt is given as its parts (a chat's messages, a completion's
prompt in pieces), each kept as a hash and a length.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hearth.runtime.manager import Runner

Prompt = tuple[tuple[int, int], ...]
AFFINITY_SLACK = 4  # a replica holding a prompt's prefix is preferred unless this many more requests wait on it


def runner_key(name: str, replica: int) -> str:
    """A runner's name in the manager's table: the model's name, with `#N` for replicas after the first."""
    return name if replica == 0 else f"{name}#{replica}"


def affinity_parts(parts: list[str]) -> Prompt:
    """A prompt as its parts (a chat's messages), each as its hash and length, for `shared_prefix`."""
    return tuple((hash(part), len(part)) for part in parts)


def shared_prefix(a: Prompt, b: Prompt) -> int:
    """How long the leading parts two prompts share are (characters)."""
    total = 0
    for left, right in zip(a, b, strict=False):
        if left != right:
            break
        total += left[1]
    return total


def slots(runner: Runner) -> int:
    """Requests the runner works on at once (llama.cpp's slots); more wait in its queue."""
    return max(1, runner.info.parallel if runner.info else 1)


def choose(ready: list[Runner], prompt: Prompt) -> Runner:
    """The replica for a request whose prompt is `prompt` (empty: no preference), noted as served by it."""
    least = min(ready, key=lambda r: r.active)
    chosen = least
    if prompt:
        scores = {id(r): max((shared_prefix(prompt, seen) for seen in r.recent), default=0) for r in ready}
        best = max(ready, key=lambda r: (scores[id(r)], -r.active))
        # Its cache saves reading the prefix again; waiting for a slot, or behind many requests, costs more.
        if scores[id(best)] and best.active < slots(best) and best.active - least.active < AFFINITY_SLACK:
            chosen = best
        chosen.recent.append(prompt)
    chosen.last_used = time.monotonic()
    return chosen
