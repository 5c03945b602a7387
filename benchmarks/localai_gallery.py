"""How much of LocalAI's model gallery Hearth can install and run, counted per LocalAI backend.

Reads a copy of LocalAI's gallery folder (by default the pinned one in tests/data/localai-gallery: its index and
the base configs the entries name), takes every entry as Hearth's gallery reader takes it, and counts, per backend
as LocalAI names it: entries, entries Hearth accepts (the entry and its config read), and entries whose every
file a Hearth backend loads (hearth/gallery/assess.py, the judgement /models/available shows). Nothing is
downloaded. `--reasons` also lists why the rest are out, most common first.

    python benchmarks/localai_gallery.py [--gallery DIR] [--reasons]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hearth.gallery.assess import Assessment, assess  # noqa: E402
from hearth.gallery.catalog import BaseConfig, combine, parse_entry, read_base, read_index  # noqa: E402
from hearth.gallery.download import DownloadError  # noqa: E402

PINNED = ROOT / "tests" / "data" / "localai-gallery" / "gallery"


def _base(location: str, folder: Path, cache: dict[str, BaseConfig | DownloadError]) -> BaseConfig | DownloadError:
    """A base config from the local copy: `github:mudler/LocalAI/gallery/NAME.yaml@REF` is `folder/NAME.yaml`."""
    if location not in cache:
        name = location.split("@", 1)[0].rsplit("/", 1)[-1]
        path = folder / name
        try:
            cache[location] = read_base(path.read_text(encoding="utf-8"), location)
        except OSError:
            cache[location] = DownloadError(f"{location} is not in the copy ({path})")
        except DownloadError as exc:
            cache[location] = exc
    return cache[location]


def judge(folder: Path) -> list[tuple[str, str, bool, Assessment]]:
    """(name, LocalAI backend, accepted, assessment) for every entry of the index in `folder`."""
    index = folder / "index.yaml"
    text = index.read_text(encoding="utf-8") if index.exists() else \
        gzip.decompress((folder / "index.yaml.gz").read_bytes()).decode("utf-8")
    bases: dict[str, BaseConfig | DownloadError] = {}
    results = []
    for number, item in enumerate(read_index(text, str(index))):
        raw_name = str(item.get("name", f"entry {number}")) if isinstance(item, dict) else f"entry {number}"
        try:
            entry = parse_entry(item, "localai")
        except ValueError as exc:
            results.append((raw_name, _named_backend(item, folder, bases), False,
                            Assessment(backend="", usable=False, reason=f"the entry cannot be read: {exc}")))
            continue
        base = _base(entry.url, folder, bases) if entry.url else None
        if isinstance(base, DownloadError):
            results.append((entry.name, str(entry.overrides.get("backend") or "?"), False,
                            Assessment(backend="", usable=False, reason=str(base))))
            continue
        config, files = combine(entry, base)
        verdict = assess(config, files)
        accepted = verdict.usable or not (verdict.reason or "").startswith(("its config is refused", "it names no"))
        results.append((entry.name, verdict.backend or "(none)", accepted, verdict))
    return results


def _named_backend(item: object, folder: Path, bases: dict[str, BaseConfig | DownloadError]) -> str:
    if not isinstance(item, dict):
        return "?"
    overrides = item.get("overrides") if isinstance(item.get("overrides"), dict) else {}
    if overrides.get("backend"):
        return str(overrides["backend"])
    base = _base(str(item["url"]), folder, bases) if isinstance(item.get("url"), str) else None
    return str(base.config.get("backend") or "?") if isinstance(base, BaseConfig) else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=Path, default=PINNED, help="a folder holding index.yaml and base configs")
    parser.add_argument("--reasons", action="store_true", help="list why entries are out, most common first")
    args = parser.parse_args()
    results = judge(args.gallery)
    rows: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for _, backend, accepted, verdict in results:
        row = rows[backend]
        row[0] += 1
        row[1] += accepted
        row[2] += verdict.usable
    print(f"{'LocalAI backend':<24} {'entries':>8} {'accepted':>9} {'loadable':>9}")
    for backend, (total, accepted, loadable) in sorted(rows.items(), key=lambda item: (-item[1][2], -item[1][0])):
        print(f"{backend:<24} {total:>8} {accepted:>9} {loadable:>9}")
    totals = [sum(row[i] for row in rows.values()) for i in range(3)]
    print(f"{'all':<24} {totals[0]:>8} {totals[1]:>9} {totals[2]:>9}")
    if args.reasons:
        reasons = collections.Counter(_kind(verdict.reason or "") for _, _, _, verdict in results if not verdict.usable)
        print()
        for reason, count in reasons.most_common():
            print(f"{count:>5}  {reason}")


def _kind(reason: str) -> str:
    """A reason without the entry's own names, so like reasons count together."""
    if reason.startswith("backend '"):
        return "a backend Hearth does not have"
    return reason.split(": ")[0] if ": " in reason else reason


if __name__ == "__main__":
    main()
