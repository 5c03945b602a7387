"""JSON Schema -> GBNF (llama.cpp's grammar format), built in the API process and sent to the runner as text.

The grammar accepts only JSON that validates against the schema. Where the schema allows more than the grammar
does (extra properties when `additionalProperties` is not false, optional properties in another order), the
grammar takes the narrower path: every output still validates. Keywords it cannot enforce are refused with a
`SchemaNotSupported` naming the keyword, never silently ignored. `format` is an annotation in JSON Schema; the
common ones (date, time, date-time, uuid) are enforced, others are plain strings.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Keywords that only describe: nothing to enforce.
ANNOTATIONS = frozenset({
    "title", "description", "examples", "example", "default", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "strict", "nullable", "discriminator", "contentMediaType", "contentEncoding",
})
HANDLED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength", "maxLength", "format",
})
MAX_REPEAT = 1000  # llama.cpp expands {m,n}; keep the expansion bounded

PRIMITIVES = {
    "space": '( " " | "\\n" [ \\t]{0,8} )?',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" ( ["\\\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
    "string": '"\\"" char* "\\""',
    "integer": '( "-"? ( "0" | [1-9] [0-9]{0,15} ) )',
    "number": '( "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )? )',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space ( string space ":" space value ( space "," space string space ":" space value )* space )? "}"',
    "array": '"[" space ( value ( space "," space value )* space )? "]"',
}
PRIMITIVE_DEPENDENCIES = {
    "string": ["char"], "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["space", "string", "value"], "array": ["space", "value"],
}
FORMATS = {
    "date": '"\\"" [0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] ) "\\""',
    "time": '"\\"" ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? '
            '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ) "\\""',
    "date-time": '"\\"" [0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] ) "T" '
                 '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? '
                 '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ) "\\""',
    "uuid": '"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12} '
            '"\\""',
}


class SchemaNotSupported(ValueError):
    """The schema uses something the grammar cannot enforce; `keyword` names it, `path` says where."""

    def __init__(self, message: str, keyword: str, path: str) -> None:
        super().__init__(message)
        self.keyword = keyword
        self.path = path


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    escaped = escaped.replace("\t", "\\t")
    return f'"{escaped}"'


def json_literal(value: Any) -> str:
    """A GBNF rule body matching the JSON text of `value` (compact)."""
    return literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class GrammarBuilder:
    """Collects rules; `schema()` turns a JSON schema into a rule and returns its name."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._refs: dict[str, str] = {}  # $ref -> rule, for the schema being visited
        self._root_schema: Any = None

    # -- rules -------------------------------------------------------------------------------------------

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = PRIMITIVES[name]
            for dependency in PRIMITIVE_DEPENDENCIES.get(name, []):
                self.primitive(dependency)
        return name

    def add(self, hint: str, body: str) -> str:
        """Add a rule under a fresh name made from `hint`; an identical existing rule is reused."""
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-").lower() or "rule"
        name, n = base, 1
        while name in self.rules:
            if self.rules[name] == body:
                return name
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = body
        return name

    def render(self, root_body: str) -> str:
        lines = [f"root ::= {root_body}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    # -- schemas -----------------------------------------------------------------------------------------

    def schema(self, schema: Any, name: str = "schema", path: str = "$") -> str:
        """The rule for `schema`, whose `$ref`s resolve inside it."""
        outer, self._root_schema, self._refs = (self._root_schema, self._refs), schema, {}
        try:
            return self._visit(schema, name, path)
        finally:
            self._root_schema, self._refs = outer

    def _refuse(self, keyword: str, path: str, why: str = "") -> SchemaNotSupported:
        detail = f" ({why})" if why else ""
        return SchemaNotSupported(f"the JSON schema keyword '{keyword}' at {path} cannot be enforced by a grammar"
                                  f"{detail}", keyword, path)

    def _visit(self, schema: Any, name: str, path: str) -> str:
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise self._refuse("false", path, "a schema that accepts nothing")
        if not isinstance(schema, dict):
            raise SchemaNotSupported(f"the JSON schema at {path} must be an object, got {type(schema).__name__}",
                                     "type", path)
        for keyword in schema:
            if keyword not in HANDLED and keyword not in ANNOTATIONS:
                raise self._refuse(keyword, path)
        if "$ref" in schema:
            return self._ref(schema["$ref"], path)
        if "const" in schema:
            return self.add(f"{name}-const", json_literal(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaNotSupported(f"'enum' at {path} must be a non-empty list", "enum", path)
            return self.add(f"{name}-enum", " | ".join(json_literal(v) for v in values))
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                options = schema[keyword]
                if not isinstance(options, list) or not options:
                    raise SchemaNotSupported(f"'{keyword}' at {path} must be a non-empty list", keyword, path)
                rest = {k: v for k, v in schema.items() if k != keyword and k not in ANNOTATIONS}
                names = [self._visit({**rest, **option} if rest and isinstance(option, dict) else option,
                                     f"{name}-{i}", f"{path}.{keyword}[{i}]") for i, option in enumerate(options)]
                return self.add(name, " | ".join(names))
        if "allOf" in schema:
            return self._visit(self._merge_all_of(schema, path), name, path)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise SchemaNotSupported(f"'type' at {path} must not be an empty list", "type", path)
            names = [self._visit({**schema, "type": k}, f"{name}-{k}", path) for k in kind]
            return self.add(name, " | ".join(names))
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                return self.primitive("value")
        if kind == "object":
            return self._object(schema, name, path)
        if kind == "array":
            return self._array(schema, name, path)
        if kind == "string":
            return self._string(schema, name, path)
        if kind in ("integer", "number", "boolean", "null"):
            return self.primitive(kind)
        raise SchemaNotSupported(f"unknown JSON schema type '{kind}' at {path}", "type", path)

    def _ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self._refuse("$ref", path, "only references inside the schema (#/...) are supported")
        if ref in self._refs:
            return self._refs[ref]
        target: Any = self._root_schema
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaNotSupported(f"'$ref' {ref} at {path} points at nothing", "$ref", path)
            target = target[part]
        rule = self.add(f"ref-{ref.rsplit('/', 1)[-1]}", "__placeholder__")
        self._refs[ref] = rule
        self.rules[rule] = self._visit(target, f"{rule}-def", ref)
        return rule

    def _merge_all_of(self, schema: dict[str, Any], path: str) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for i, part in enumerate(schema["allOf"]):
            while isinstance(part, dict) and "$ref" in part and len(part) == 1:
                ref = part["$ref"]
                target: Any = self._root_schema
                for key in ref[1:].split("/")[1:]:
                    target = target.get(key) if isinstance(target, dict) else None
                if target is None:
                    raise SchemaNotSupported(f"'$ref' {ref} in allOf at {path} points at nothing", "$ref", path)
                part = target
            if not isinstance(part, dict):
                raise self._refuse("allOf", f"{path}.allOf[{i}]")
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *value]
                elif key in ANNOTATIONS:
                    continue
                elif key in merged and merged[key] != value:
                    raise self._refuse("allOf", path, f"its parts disagree on '{key}'")
                else:
                    merged[key] = value
        return merged

    def _object(self, schema: dict[str, Any], name: str, path: str) -> str:
        properties = schema.get("properties") or {}
        if not isinstance(properties, dict):
            raise SchemaNotSupported(f"'properties' at {path} must be an object", "properties", path)
        required = schema.get("required") or []
        missing = [key for key in required if key not in properties]
        extra = schema.get("additionalProperties")
        if missing and extra is False:
            raise SchemaNotSupported(f"property '{missing[0]}' at {path} is required but not allowed", "required",
                                     path)
        self.primitive("space")
        if not properties and not missing:
            if extra is False:
                return self.add(f"{name}-empty", '"{" space "}"')
            if isinstance(extra, dict) and extra:
                value = self._visit(extra, f"{name}-value", f"{path}.additionalProperties")
                self.primitive("string")
                return self.add(name, f'"{{" space ( string space ":" space {value} ( space "," space string space ":" '
                                      f'space {value} )* space )? "}}"')
            return self.primitive("object")
        order = list(properties)
        pairs = []
        for key in order:
            value = self._visit(properties[key], f"{name}-{key}", f"{path}.properties.{key}")
            pairs.append(self.add(f"{name}-{key}-kv", f'{literal(json.dumps(key, ensure_ascii=False))} space ":" '
                                                      f"space {value}"))
        is_required = [key in required for key in order]
        if missing:  # required but not listed under properties: any value
            for key in missing:
                order.append(key)
                pairs.append(self.add(f"{name}-{key}-kv", f'{literal(json.dumps(key, ensure_ascii=False))} space '
                                                          f'":" space {self.primitive("value")}'))
                is_required.append(True)

        def tail(start: int) -> str:
            parts = []
            for i in range(start, len(order)):
                parts.append(f'space "," space {pairs[i]}' if is_required[i] else f'( space "," space {pairs[i]} )?')
            return " ".join(parts)

        first_required = next((i for i, r in enumerate(is_required) if r), None)
        last_start = first_required if first_required is not None else len(order) - 1
        starts = [f"{pairs[i]} {tail(i + 1)}".strip() for i in range(last_start + 1)]
        body = " | ".join(f"( {s} )" for s in starts)
        body = f"( {body} ) space" if first_required is not None else f"( ( {body} ) space )?"
        return self.add(name, f'"{{" space {body} "}}"')

    def _array(self, schema: dict[str, Any], name: str, path: str) -> str:
        low = schema.get("minItems", 0)
        high = schema.get("maxItems")
        for keyword, bound in (("minItems", low), ("maxItems", high)):
            if bound is not None and (not isinstance(bound, int) or bound < 0 or bound > MAX_REPEAT):
                raise SchemaNotSupported(f"'{keyword}' at {path} must be an integer from 0 to {MAX_REPEAT}",
                                         keyword, path)
        self.primitive("space")
        prefix = schema.get("prefixItems")
        if prefix is not None:
            items = [self._visit(item, f"{name}-{i}", f"{path}.prefixItems[{i}]") for i, item in enumerate(prefix)]
            if schema.get("items", False) is not False or low > len(items):
                raise self._refuse("prefixItems", path, "only fixed-length tuples (items: false) are supported")
            if not items:
                return self.add(name, '"[" space "]"')
            return self.add(name, '"[" space ' + ' space "," space '.join(items) + ' space "]"')
        item = self._visit(schema.get("items", True), f"{name}-item", f"{path}.items")
        if high == 0:
            return self.add(name, '"[" space "]"')
        if high is not None and high < low:
            raise SchemaNotSupported(f"'maxItems' at {path} is smaller than 'minItems'", "maxItems", path)
        more = f'( space "," space {item} )'
        if low == 0:
            rest = f"{more}*" if high is None else (f"{more}{{0,{high - 1}}}" if high > 1 else "")
            return self.add(name, f'"[" space ( {item} {rest} space )? "]"')
        rest = f"{more}{{{low - 1},}}" if high is None else f"{more}{{{low - 1},{high - 1}}}"
        return self.add(name, f'"[" space {item} {rest} space "]"')

    def _string(self, schema: dict[str, Any], name: str, path: str) -> str:
        fmt = schema.get("format")
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        for keyword, bound in (("minLength", low), ("maxLength", high)):
            if bound is not None and (not isinstance(bound, int) or bound < 0 or bound > MAX_REPEAT):
                raise SchemaNotSupported(f"'{keyword}' at {path} must be an integer from 0 to {MAX_REPEAT}",
                                         keyword, path)
        if fmt in FORMATS:
            if low or high is not None:
                raise self._refuse("minLength" if low else "maxLength", path, f"together with format '{fmt}'")
            return self.add(f"{fmt}-string", FORMATS[fmt])
        if not low and high is None:
            return self.primitive("string")
        self.primitive("char")
        count = f"{{{low},}}" if high is None else f"{{{low},{high}}}"
        return self.add(name, f'"\\"" char{count} "\\""')


def strict_schema(schema: Any) -> Any:
    """OpenAI's strict mode: every object takes no properties beyond those it lists."""
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    for key in ("properties", "$defs", "definitions"):
        if isinstance(result.get(key), dict):
            result[key] = {name: strict_schema(sub) for name, sub in result[key].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(result.get(key), list):
            result[key] = [strict_schema(sub) for sub in result[key]]
    for key in ("items", "additionalProperties"):
        if isinstance(result.get(key), dict):
            result[key] = strict_schema(result[key])
    if result.get("type") == "object" or "properties" in result:
        result.setdefault("additionalProperties", False)
    return result


def schema_grammar(schema: Any) -> str:
    """The GBNF for one JSON value validating against `schema`."""
    builder = GrammarBuilder()
    rule = builder.schema(schema, "value-schema" if schema not in (True, {}) else "value")
    return builder.render(rule)


def json_object_grammar() -> str:
    """The GBNF for any one JSON object (response_format json_object)."""
    builder = GrammarBuilder()
    return builder.render(builder.primitive("object"))
