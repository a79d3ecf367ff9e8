"""Versioned prompt templates, stored as JSON files in ``pipeline/teacher/templates/``.

A template is data, not code, so that the teacher cache can key every call on *which* prompt produced it: the
template's ``version`` says when its meaning changed on purpose, and its ``sha256`` (of the file's bytes) says
when anything changed at all, a stray space included. Both go into the cache key, so editing a template never
serves answers that were given to the old wording.

A template file holds ``name`` (its file stem), ``version`` (an integer), ``kind`` (``listwise``, ``pointwise``
or ``generation``: which parts it must have), an optional ``description`` and ``parts``: the message texts, with
``str.format`` placeholders drawn from a fixed set (``{num}``, ``{query}``, ``{i}``, ``{passage}``), checked
at load time so that a misspelt placeholder fails when the template is read, not half-way through a run.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, cast

TemplateKind = Literal["listwise", "pointwise", "generation"]

SUFFIX = ".json"
SHORT_HASH_CHARS = 12

# The placeholders a part may use, and the parts each kind of template must define.
PLACEHOLDERS = frozenset({"num", "query", "i", "passage"})
REQUIRED_PARTS: dict[str, tuple[str, ...]] = {
    "listwise": ("system", "prefix_user", "prefix_assistant", "passage_user", "passage_assistant", "final_user"),
    "pointwise": ("system", "user"),
    "generation": ("system", "user"),
}


class TemplateError(ValueError):
    """A missing or malformed prompt template; the message names the template (or file) and the problem."""


@dataclass(frozen=True)
class PromptTemplate:
    """One prompt template as read from its file.

    ``parts`` keeps the file's order as ``(key, text)`` pairs (a tuple, so the template stays hashable).
    """

    name: str
    version: int
    kind: TemplateKind
    parts: tuple[tuple[str, str], ...]
    sha256: str
    description: str = ""
    path: str | None = None

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of ``sha256``: enough to tell versions apart in logs and cache keys."""
        return self.sha256[:SHORT_HASH_CHARS]

    @property
    def ref(self) -> str:
        """``name@vVERSION+HASH``, the template's identity in the cache and in reports."""
        return f"{self.name}@v{self.version}+{self.short_hash}"

    def part(self, key: str) -> str:
        for name, text in self.parts:
            if name == key:
                return text
        raise TemplateError(f"template {self.name!r} has no part {key!r} (parts: {[k for k, _ in self.parts]})")

    def render(self, key: str, **values: object) -> str:
        """Fill one part's placeholders. Values are inserted verbatim: braces inside a passage are not parsed.

        >>> t = parse_template({"name": "t", "version": 1, "kind": "pointwise",
        ...                     "parts": {"system": "s", "user": "Q: {query} P: {passage}"}}, b"")
        >>> t.render("user", query="a {b}", passage="c")
        'Q: a {b} P: c'
        """
        try:
            return self.part(key).format(**values)
        except KeyError as err:
            raise TemplateError(f"template {self.name!r} part {key!r} needs a value for {err}") from None


def placeholders(text: str) -> set[str]:
    """The named ``str.format`` fields in ``text``.

    >>> sorted(placeholders("[{i}] {passage} {{literal}}"))
    ['i', 'passage']
    """
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def parse_template(raw: object, content: bytes, source: str = "<template>") -> PromptTemplate:
    """Validate a template's parsed JSON; ``content`` is the file's bytes (hashed as they are)."""
    if not isinstance(raw, dict):
        raise TemplateError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - {"name", "version", "kind", "description", "parts"}
    if unknown:
        raise TemplateError(f"{source}: unknown keys {sorted(unknown)}")
    name, version, kind, parts = raw.get("name"), raw.get("version"), raw.get("kind"), raw.get("parts")
    if not isinstance(name, str) or not name:
        raise TemplateError(f"{source}: 'name' must be a non-empty string")
    # bool is an int subclass: reject it so that `"version": true` is not read as 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TemplateError(f"{source}: 'version' must be a positive integer (got {version!r})")
    if kind not in REQUIRED_PARTS:
        raise TemplateError(f"{source}: 'kind' must be one of {sorted(REQUIRED_PARTS)} (got {kind!r})")
    if not isinstance(parts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in parts.items()):
        raise TemplateError(f"{source}: 'parts' must map part names to strings")
    missing = [key for key in REQUIRED_PARTS[kind] if key not in parts]
    if missing:
        raise TemplateError(f"{source}: a {kind} template needs parts {missing}")
    for key, text in parts.items():
        try:
            fields = placeholders(text)
        except ValueError as err:  # an unbalanced brace
            raise TemplateError(f"{source}: part {key!r} is not a valid format string: {err}") from None
        stray = fields - PLACEHOLDERS
        if stray:
            raise TemplateError(f"{source}: part {key!r} uses unknown placeholders {sorted(stray)}")
    description = raw.get("description", "")
    return PromptTemplate(
        name=name,
        version=version,
        kind=cast(TemplateKind, kind),
        parts=tuple(parts.items()),
        sha256=hashlib.sha256(content).hexdigest(),
        description=description if isinstance(description, str) else "",
        path=None if source.startswith("<") else source,
    )


def load_template_file(path: Path | str) -> PromptTemplate:
    """Read a template from an explicit file (an experiment's own prompt, or a copy under test)."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"{path}: template file not found")
    content = path.read_bytes()
    try:
        raw = json.loads(content.decode("utf-8-sig"))  # a byte order mark is no JSON
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TemplateError(f"{path}: not valid UTF-8 JSON: {err}") from None
    return parse_template(raw, content, str(path))


def _package_dir() -> Path:
    # The templates ship inside the package; resources.files resolves them in a checkout and in a wheel alike.
    return Path(str(resources.files("pipeline.teacher").joinpath("templates")))


def available_templates() -> tuple[str, ...]:
    """The names of the templates shipped with the package, sorted.

    >>> "rankgpt-listwise" in available_templates()
    True
    """
    return tuple(sorted(p.name.removesuffix(SUFFIX) for p in _package_dir().glob(f"*{SUFFIX}")))


def load_template(name: str) -> PromptTemplate:
    """Load a shipped template by name.

    >>> t = load_template("rankgpt-listwise")
    >>> t.kind, t.version, len(t.short_hash)
    ('listwise', 1, 12)
    >>> load_template("rankgpt")
    Traceback (most recent call last):
    ...
    pipeline.teacher.templates.TemplateError: unknown prompt template 'rankgpt' (known: ...)
    """
    known = available_templates()
    if name not in known:
        raise TemplateError(f"unknown prompt template {name!r} (known: {', '.join(known)})")
    template = load_template_file(_package_dir() / f"{name}{SUFFIX}")
    if template.name != name:
        # the name inside the file is what reports show: it must not disagree with the name it is loaded by
        raise TemplateError(f"{template.path}: declares name {template.name!r}, but its file is {name}{SUFFIX}")
    return template
