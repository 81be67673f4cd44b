"""Check the relative links of the project's Markdown: every file exists, every anchor matches.

``python deploy/check_links.py [FILE ...]`` (``make lint`` runs it on the default set):
every relative link or image in README.md, docs/*.md, bench/README.md and
tests/container/README.md must name a file or folder of the repository, and every
``#anchor`` (in the same file or in another Markdown file) a heading under GitHub's slug
rules. External links (``https:``, ``mailto:``, ...) are not fetched: CI has no network.
Exit 1 with one line per broken link.

Why a script of our own: the Markdown link checkers on PyPI fetch external URLs, or are
unmaintained; this one needs the standard library only and runs offline in milliseconds.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILES = ("README.md", "docs/*.md", "bench/README.md", "tests/container/README.md")

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target): the target is the first token in parentheses.
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^\s)>]*)>?(?:\s+[^)]*)?\)")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_HTML_ANCHOR = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""")


@dataclass(frozen=True, slots=True)
class Link:
    source: Path
    line: int
    target: str


def _text_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield (number, line) outside fenced code blocks: a link in an example is no link."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker[0] * len(marker)
                continue
            if marker.startswith(fence):
                fence = None
                continue
        if fence is None:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("*", "")  # emphasis markers (underscores stay: GitHub keeps them)
    kept = []
    for char in text.lower():
        category = unicodedata.category(char)
        if char in " -_" or category[0] in "LN" or category == "Mn":
            kept.append(char)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file: heading slugs (repeats get -1, -2, ...), <a name>."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _text_lines(path.read_text(encoding="utf-8")):
        found.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> Iterator[Link]:
    for number, line in _text_lines(path.read_text(encoding="utf-8")):
        bare = _CODE_SPAN.sub("", line)  # `[x](y)` inside a code span is text
        targets = [m.group(1) for m in _INLINE_LINK.finditer(bare)]
        definition = _REFERENCE_DEF.match(bare)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            if target and not _SCHEME.match(target):
                yield Link(path, number, target)


def problem(link: Link, cache: dict[Path, set[str]]) -> str | None:
    """Why a link does not resolve, or None."""
    file_part, _, anchor = link.target.partition("#")
    target = (link.source.parent / file_part).resolve() if file_part else link.source
    if not target.exists():
        return f"no such file or folder: {file_part}"
    if not anchor or target.suffix != ".md":
        return None
    if target not in cache:
        cache[target] = anchors(target)
    if anchor not in cache[target]:
        return f"no heading with the anchor #{anchor} in {target.relative_to(ROOT)}"
    return None


def check(files: list[Path]) -> list[str]:
    cache: dict[Path, set[str]] = {}
    errors = []
    for path in files:
        for link in links(path):
            reason = problem(link, cache)
            if reason:
                where = link.source.relative_to(ROOT)
                errors.append(f"{where}:{link.line}: broken link ({link.target}): {reason}")
    return errors


def main(argv: list[str]) -> int:
    if argv:
        files = [Path(arg).resolve() for arg in argv]
    else:
        files = sorted({p.resolve() for pattern in DEFAULT_FILES for p in ROOT.glob(pattern)})
    errors = check(files)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print(f"{len(errors)} broken link(s)", file=sys.stderr)
        return 1
    print(f"links: {len(files)} files checked, every relative link resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
