"""The policy's plain text as a structure a template renders: its title, "Last
updated" line, and clauses of headings, paragraphs and lists. The text is never
turned into HTML here; the template escapes every piece (Jinja autoescape).

The format of ``texts/*.txt``: the first line is the title; ``Last updated: ...``;
``N. Heading`` opens clause N; a line starting with ``•`` is a list item (``Term — rest``
shows the term in bold); a short line without final punctuation right before a list is
a sub-heading; anything else is a paragraph. Pure code; imports the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_CLAUSE = re.compile(r"^(\d+)\.\s+(\S.*)$")
_BULLET = "•"
_UPDATED = "Last updated:"
_SUBHEADING_MAX = 60


@dataclass(frozen=True, slots=True)
class Block:
    kind: str  # "p", "h3" or "ul"
    text: str = ""
    items: tuple[tuple[str, str], ...] = ()  # (bold term or "", rest)


@dataclass(slots=True)
class Clause:
    number: int
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return f"clause-{self.number}"


@dataclass(slots=True)
class Document:
    title: str
    last_updated: str
    preamble: list[Block] = field(default_factory=list)
    clauses: list[Clause] = field(default_factory=list)


def _item(line: str) -> tuple[str, str]:
    text = line.strip().removeprefix(_BULLET).strip()
    term, dash, rest = text.partition(" — ")
    return (term, rest) if dash and len(term) <= _SUBHEADING_MAX else ("", text)


def _blocks(lines: list[str]) -> list[Block]:
    blocks: list[Block] = []
    items: list[tuple[str, str]] = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith(_BULLET):
            items.append(_item(line))
            continue
        if items:
            blocks.append(Block("ul", items=tuple(items)))
            items = []
        following = next((n for n in lines[i + 1:] if n.strip()), "")
        if len(line) <= _SUBHEADING_MAX and line[-1] not in ".:;," \
                and following.lstrip().startswith(_BULLET):
            blocks.append(Block("h3", line.strip()))
        else:
            blocks.append(Block("p", line.strip()))
    if items:
        blocks.append(Block("ul", items=tuple(items)))
    return blocks


def parse(text: str) -> Document:
    lines = [line.rstrip() for line in text.splitlines()]
    content = [line for line in lines if line.strip()]
    if not content:
        raise ValueError("the policy text is empty")
    doc = Document(title=content[0].strip(), last_updated="")
    current: list[str] = []
    clause: Clause | None = None

    def close() -> None:
        blocks = _blocks(current)
        if clause is None:
            doc.preamble.extend(blocks)
        else:
            clause.blocks.extend(blocks)

    for line in content[1:]:
        if line.startswith(_UPDATED) and not doc.last_updated:
            doc.last_updated = line.removeprefix(_UPDATED).strip()
            continue
        m = _CLAUSE.match(line)
        if m:
            close()
            current = []
            clause = Clause(int(m.group(1)), m.group(2).strip())
            doc.clauses.append(clause)
            continue
        current.append(line)
    close()
    return doc
