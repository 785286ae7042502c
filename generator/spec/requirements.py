"""The requirements of requirements.md, by id: what MADs and acceptance areas say they prove.

requirements.md stays free Markdown; a requirement is marked by an id, in one of two forms:

- `R<number>.` starting a line, e.g. `R1. **Conversations.** Any MAD ...`: the number has no
  leading zeros and a space (or the end of the line) follows the dot. It may come after a
  bullet (`- R2. ...`, `* `, `+ `) or a heading marker (`## R3. Secrets`), and after up to
  three spaces of indentation;
- `{#slug}` ending a line, e.g. `## Conversations persist {#conversations-persist}`: the slug is
  lower-case letters, digits and `-`, starting with a letter.

A requirement runs from its line to the line before the next requirement, or before the next
heading that is not a requirement (a heading requirement keeps its deeper sub-headings), or
to the end of the file; trailing blank lines are dropped. Its `text` is that Markdown with the
first line's bullet or heading marker and its id taken off, and the later lines dedented by
their common indentation (so a list item's continuation reads as plain Markdown). Lines inside
fenced code blocks (``` or ~~~) never start a requirement.

What is refused, each as a problem at its line (the loader reports them with file:line):

- a malformed id, i.e. something that looks like an attempt at one: a line starting `R01.`,
  `R1a.`, `R.`, `r1.`, `R1:`, `R1)`, `R1.2`, `R1` (no dot) or `**R1.**` (bold), or ending with a
  `{#...}` whose slug is not one (`{#Bad Slug}`, `{#}`); a line starting with a word like
  `Requirements.` or `R2D2` is prose;
- a duplicate id, naming the line of the first;
- one line carrying both forms (two ids for one requirement);
- "requirement without an id": a numbered list item (`3. ...` or `3) ...`) at the start of a
  line, not indented and without an id, in a section (the lines between two headings) where
  a line that is not a heading carries an id (even a malformed one). Such items are siblings
  of requirements written `R1.`, `R2.`, ...: numbered items are how requirements were written
  before ids, and one left without an id would be invisible to every reference. Numbered
  lists elsewhere are left alone: in the body of a heading requirement (`## R3. Secrets`)
  they are its content, and in a section without ids (notes, an introduction) they are prose.
  A numbered list inside an `R1.` requirement is indented under it (or written with bullets).

A file with no id at all (older specs) is fine: it has no requirements by id, and nothing is
reported. Prose without an id (an introduction, notes) is never a problem.

The loader (`load.py`) reports these problems, and checks that the ids MADs (`requirements:`)
and ecosystem.yaml (`acceptance:`) name are ids of this file; a requirement nothing names is
fine (a model-written test may prove it), and `Spec.unreferenced_requirements()` lists them.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

from .model import Requirement

__all__ = ["ParsedRequirements", "parse_requirements", "ID_FORMS"]

ID_FORMS = "'R<number>.' starting a line (like 'R1.' or 'R12.') or '{#slug}' ending it (like '{#conversations-persist}')"

# The start of a line: indentation, then an optional bullet or heading marker.
_LEAD = re.compile(r"^(?P<indent> {0,3})(?:(?P<bullet>[-*+])[ \t]+|(?P<hashes>#{1,6})[ \t]+)?")
_NUMBERED = re.compile(r"^(?P<number>R(?P<digits>[1-9][0-9]*))\.(?=\s|$)")
# The first word of a line that tries to be `R<number>.` (leading bold or italics aside), checked once
# _NUMBERED did not match: `R.`, `R01.`, `R1a.`, `r1.`, `R1:`, `R1)`, `R1.2`, `R1`; not `Requirements.`, `R2D2`.
_NUMBERED_TRY = re.compile(r"R[.:)]\S*|[Rr][0-9][0-9A-Za-z]*[.:)]\S*|R[0-9]+")
_SLUG_TRY = re.compile(r"[ \t]*\{#(?P<slug>[^{}]*)\}[ \t]*$")
_SLUG = re.compile(r"^[a-z][a-z0-9-]*$")
_ORDERED_ITEM = re.compile(r"^[0-9]{1,9}[.)](?=\s|$)")
_HEADING = re.compile(r"^ {0,3}(?P<hashes>#{1,6})(?:[ \t]|$)")
_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})")


@dataclass(frozen=True)
class ParsedRequirements:
    """What parsing requirements.md found: its requirements, and its problems as (line, message)."""

    requirements: tuple[Requirement, ...]
    problems: tuple[tuple[int, str], ...] = field(default=())


@dataclass
class _Start:
    """A line that starts a requirement: its id, its first line's text, its heading level (7: not a heading)."""

    line: int
    id: str
    first: str
    level: int


def parse_requirements(text: str) -> ParsedRequirements:
    """The requirements of requirements.md's `text`, with every problem found (see the module docstring)."""
    lines = re.split(r"\r\n|\r|\n", text)  # as editors count lines (str.splitlines also splits at \f, \x1c, ...)
    problems: list[tuple[int, str]] = []
    starts: list[_Start] = []
    ends: list[int] = []  # lines (1-based) of headings that are not requirements: each ends the one before
    heading_levels: dict[int, int] = {}
    # Numbered items by section (the lines after a heading, up to the next): in a section where a
    # line (not a heading) carries an id, the numbered items are its siblings and need one too.
    numbered_items: list[tuple[int, int]] = []
    sections_with_ids: set[int] = set()
    section = 0
    fence: str | None = None
    for number, raw in enumerate(lines, start=1):
        if fence is not None:
            if raw.lstrip(" ").startswith(fence) and not raw.strip().strip(fence[0]):
                fence = None
            continue
        if opened := _FENCE.match(raw):
            fence = opened["fence"]
            continue
        start, tried = _id_of(number, raw, problems)
        heading = _HEADING.match(raw)
        if heading:
            section += 1
        elif tried:
            sections_with_ids.add(section)
        if start is not None:
            starts.append(start)
        elif heading:
            ends.append(number)
            heading_levels[number] = len(heading["hashes"])
        elif _ORDERED_ITEM.match(raw) and not tried:
            numbered_items.append((section, number))

    problems += [(number, "requirement without an id: a numbered item among requirements that have ids; "
                  f"expected {ID_FORMS}, or indent it to make it part of the requirement above")
                 for item_section, number in numbered_items if item_section in sections_with_ids]

    first_line: dict[str, int] = {}
    for start in starts:
        if start.id in first_line:
            problems.append((start.line, f"duplicate requirement id '{start.id}' (first at line "
                             f"{first_line[start.id]}); expected each id once"))
        first_line.setdefault(start.id, start.line)

    requirements = []
    for index, start in enumerate(starts):
        stop = starts[index + 1].line if index + 1 < len(starts) else len(lines) + 1
        # A heading that is not a requirement ends it, unless it is a sub-heading of a heading requirement.
        stop = min([stop, *(n for n in ends if start.line < n < stop and heading_levels[n] <= start.level)])
        body = lines[start.line:stop - 1]
        rest = textwrap.dedent("\n".join(body))
        requirements.append(Requirement(id=start.id, text=(start.first + "\n" + rest).strip("\n").rstrip(),
                                        line=start.line))
    return ParsedRequirements(tuple(requirements), tuple(sorted(problems)))


def _id_of(number: int, raw: str, problems: list[tuple[int, str]]) -> tuple[_Start | None, bool]:
    """The requirement this line starts (or None), and whether it tries to give an id at all."""
    lead = _LEAD.match(raw)
    assert lead is not None  # every part of it is optional
    rest = raw[lead.end():]
    level = len(lead["hashes"]) if lead["hashes"] else 7
    ids: list[str] = []
    tried = False

    if numbered := _NUMBERED.match(rest):
        ids.append(numbered["number"])
        rest = rest[numbered.end():]
        tried = True
    elif rest.split() and _NUMBERED_TRY.fullmatch(rest.split()[0].lstrip("*_")):
        tried = True
        token = rest.split()[0]
        plain = "; write it plain, not in bold or italics" if token[0] in "*_" else ""
        problems.append((number, f"malformed requirement id '{token}'; expected 'R' and a number without "
                         f"leading zeros, then '.' and a space, like 'R1.' or 'R12.'{plain}"))

    if slug := _SLUG_TRY.search(rest):
        tried = True
        if _SLUG.match(slug["slug"]):
            ids.append(slug["slug"])
            rest = rest[:slug.start()]
            if len(ids) == 1:
                rest = _ORDERED_ITEM.sub("", rest, count=1)  # `3. Title {#slug}`: the number is no part of it
        else:
            problems.append((number, f"malformed requirement id '{{#{slug['slug']}}}'; expected "
                             "{#slug} with lower-case letters, digits and '-', starting with a letter, "
                             "like {#conversations-persist}"))

    if len(ids) > 1:
        problems.append((number, f"two ids for one requirement, '{ids[0]}' and '{{#{ids[1]}}}'; "
                         "expected one of them"))
    if not ids:
        return None, tried
    if lead["hashes"]:
        rest = re.sub(r"[ \t]+#+[ \t]*$", "", rest)  # a heading's optional closing hashes
    return _Start(line=number, id=ids[0], first=rest.strip(), level=level), tried
