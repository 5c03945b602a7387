"""Reading YAML as LocalAI (Go, yaml.v3) reads it, and reading YAML from others without letting it blow up.

LocalAI's files are YAML 1.2: only true/false are booleans, so `name: off` stays a string; and Go's parser takes
`"\\'"` in a double-quoted string as a quote, which LocalAI's own gallery uses (PyYAML refuses it). libyaml's parser
is used where it is installed (a 2 MB gallery index reads in under a second, against several in pure Python); a text
it refuses is read again by the pure-Python parser, which knows Go's extra escape.

Text from elsewhere (gallery indexes, base configs) goes through `load_untrusted`, which refuses a document whose
aliases would expand it past a node limit (a "billion laughs" of anchors) before anything is built from it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class YamlTooLarge(ValueError):
    """A document that would expand past the node limit."""


def _yaml12(loader: type) -> None:
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class Yaml12Loader(yaml.SafeLoader):
    """Pure Python: YAML 1.2 booleans, and Go's `\\'` escape."""

    ESCAPE_REPLACEMENTS = {**yaml.SafeLoader.ESCAPE_REPLACEMENTS, "'": "'"}


_yaml12(Yaml12Loader)
_FAST: type | None = None
if getattr(yaml, "__with_libyaml__", False):
    class _Yaml12CLoader(yaml.CSafeLoader):  # type: ignore[name-defined,misc]
        """libyaml's parser, with the same YAML 1.2 booleans."""

    _yaml12(_Yaml12CLoader)
    _FAST = _Yaml12CLoader


def _loaders() -> list[type]:
    return [_FAST, Yaml12Loader] if _FAST is not None else [Yaml12Loader]


def load_yaml(text: str) -> Any:
    """One YAML document, as LocalAI reads it."""
    for loader in _loaders()[:-1]:
        try:
            return yaml.load(text, Loader=loader)
        except yaml.YAMLError:
            continue  # read again by the pure-Python parser, which accepts a little more and says where it fails
    return yaml.load(text, Loader=Yaml12Loader)


def compose(text: str) -> yaml.Node | None:
    """The node tree of one document (for line numbers)."""
    return yaml.compose(text, Loader=Yaml12Loader)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many nodes the document holds once every alias is expanded (aliases share node objects: memoised)."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        key = id(current)
        if key in sizes:
            continue
        if isinstance(current, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children = [child for pair in current.value for child in pair] if isinstance(current, yaml.MappingNode) \
            else list(current.value)
        if children_done:
            visiting.discard(key)
            total = 1 + sum(sizes.get(id(child), 0) for child in children)
            sizes[key] = total
            if total > limit:
                raise YamlTooLarge(f"the document expands to more than {limit} YAML nodes")
            continue
        if key in visiting:
            raise YamlTooLarge("the document refers to itself (a recursive alias)")
        visiting.add(key)
        stack.append((current, True))
        for child in children:
            if id(child) in visiting:
                raise YamlTooLarge("the document refers to itself (a recursive alias)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(node)]


def load_untrusted(text: str, max_nodes: int) -> Any:
    """One YAML document from elsewhere: YamlTooLarge when its aliases expand it past `max_nodes` nodes."""
    last: yaml.YAMLError | None = None
    for loader_class in _loaders():
        loader = loader_class(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node, max_nodes)
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            last = exc
        finally:
            loader.dispose()
    assert last is not None
    raise last
