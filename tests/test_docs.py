"""The documentation's links and the code's citations of it point at something that exists.

- Links: every relative Markdown link or image ``[text](path)``, ``[text](path#anchor)`` or ``[text](#anchor)`` in
  README.md and docs/**/*.md names a file or folder that exists, and every ``#anchor`` into a Markdown file is the
  GitHub slug of one of its headings (lowercase; everything but letters, digits, ``-``, ``_`` and spaces dropped;
  spaces become ``-``; the second heading with the same slug gets ``-1``, the third ``-2``). External links
  (``http:``, ``https:``, ``mailto:``) are not checked. Code blocks and inline code are not read.
- Citations: code, configs, benchmarks and tests cite a documented section in one form,
  ``(docs/<file>.md, <heading text>)`` (or ``(README.md, <heading text>)`` for the root README), where the heading
  text equals one of that file's headings, case-insensitively (backticks ignored). The other form,
  ``docs/<file>.md (<section>)``, is refused, so that there stays one. A bare ``docs/<file>.md`` with no section
  only has to exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
CITED_FILE = r"(?:README\.md|docs/[\w./-]+\.md)"
CITATION = re.compile(rf"\(({CITED_FILE}), ([^()\n]+?)\)")
OTHER_FORM = re.compile(rf"(?<![\w/.-])({CITED_FILE}) \(([^()\n]*)\)")
MENTION = re.compile(r"(?<![\w/.-])(docs/[\w./-]+\.md)")
CODE_DIRS = ("scripts", "configs", "benchmarks", "tests")
CODE_SUFFIXES = {".py", ".json", ".yaml", ".yml", ".sh"}


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a Markdown text outside fenced code blocks."""
    lines, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    return [m.group(2) for _, line in prose_lines(path.read_text()) if (m := HEADING.match(line))]


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2, ... for repeated slugs."""
    found, seen = set(), {}
    for heading in headings(path):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image of a Markdown file, outside code."""
    found = []
    for number, line in prose_lines(path.read_text()):
        line = INLINE_CODE.sub("", line)
        found += [(number, m.group(1)) for m in LINK.finditer(line)]
        found += [(number, m.group(1)) for m in REFERENCE.finditer(line)]
    return found


def broken_links(path: Path) -> list[str]:
    """What is wrong with the relative links of one Markdown file, one line per broken link."""
    problems = []
    for number, target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)} line {number}: ({target})"
        if not destination.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where}: no heading of {destination.relative_to(ROOT)} has the anchor #{anchor}")
    return problems


def code_files() -> list[Path]:
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in CODE_SUFFIXES]
    return sorted(p for p in files if p.resolve() != Path(__file__).resolve() and ".nox" not in p.parts)


def heading_key(text: str) -> str:
    return " ".join(text.replace("`", "").split()).lower()


# ---------------------------------------------------------------------------------------------------------- slugs


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Real data", "real-data"),
    ("The study (scripts/evaluation/study.py)", "the-study-scriptsevaluationstudypy"),
    ("GPU fast path: `fast` in configs/train.json", "gpu-fast-path-fast-in-configstrainjson"),
    ("Speed (one map from an existing trace, `benchmarks/lrp_speed.py`)",
     "speed-one-map-from-an-existing-trace-benchmarkslrp_speedpy"),
    ("2026-12-06: consistency training adopted", "2026-12-06-consistency-training-adopted"),
    ("LRP composites: gamma rule, zennit's named composites, bias-free rules",
     "lrp-composites-gamma-rule-zennits-named-composites-bias-free-rules"),
    ("MONAI Bundle Commands", "monai-bundle-commands"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Notes\n\n## Run time\n\n```bash\n# not a heading\n```\n\n## Run time\n\n## Run time\n")
    assert anchors(doc) == {"notes", "run-time", "run-time-1", "run-time-2"}


def test_a_broken_link_or_anchor_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n\n[fine](other.md#a-section), [fine](#doc), [web](https://example.org/x#y),\n"
                   "`[in code](missing.md)`\n\n[gone](missing.md) and [no anchor](other.md#no-such-section)\n"
                   "and [no local anchor](#nowhere)\n\n```\n[in a block](missing.md)\n```\n")
    problems = broken_links(doc)
    assert len(problems) == 3, problems
    assert "missing.md does not exist" in problems[0]
    assert "#no-such-section" in problems[1] and "#nowhere" in problems[2]


# ------------------------------------------------------------------------------------------------------ the docs


@pytest.mark.parametrize("document", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(document):
    problems = broken_links(document)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_code_cites_doc_sections_that_exist():
    problems, cited = [], 0
    for path in code_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            where = f"{path.relative_to(ROOT)} line {number}"
            for match in OTHER_FORM.finditer(line):
                problems.append(f"{where}: '{match.group(0)}': cite a section as ({match.group(1)}, <heading text>)")
            for match in CITATION.finditer(line):
                cited += 1
                target, section = ROOT / match.group(1), match.group(2)
                if not target.is_file():
                    problems.append(f"{where}: {match.group(1)} does not exist")
                elif heading_key(section) not in {heading_key(h) for h in headings(target)}:
                    problems.append(f"{where}: {match.group(1)} has no heading '{section}' (its headings: "
                                    f"{'; '.join(headings(target))})")
            for match in MENTION.finditer(line):
                if not (ROOT / match.group(1)).is_file():
                    problems.append(f"{where}: {match.group(1)} does not exist")
    assert not problems, "\n".join(problems)
    assert cited, "no (docs/<file>.md, <heading>) citation found: the pattern no longer matches the code"
