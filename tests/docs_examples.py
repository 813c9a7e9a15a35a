"""The code blocks of the docs, read as a reader meets them: what runs, what is a file.

A page's fenced blocks, in the order printed:

- ``python``: run, in one module namespace per run of the page;
- ``bash``: run with ``bash -euo pipefail`` (a line ending in ``&`` keeps running in
  the background until the page is done, as a second terminal would);
- any block with ``title="path"`` (``python title="bank/projectors.py"``): a file
  the reader saves, written to the page's folder (which is on ``sys.path``);
- a block right after ``<!-- not run: why -->`` is shown and not run (installing,
  starting a server that never ends); the reason is required;
- every other language (``text``, ``console``, ``sql``, ``mermaid``, ``toml``) is shown only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE = {"python", "bash"}

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>.*)$")
_TITLE = re.compile(r'title="(?P<title>[^"]+)"')
_NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<why>.*?)\s*-->\s*$")
#: What a reader could not copy as it is: an elision or a slot to fill in.
PLACEHOLDER = re.compile(r"\[\.\.\.\]|<(?:your|YOUR)[^>]*>|\bTODO\b|\bFIXME\b")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    title: str | None
    code: str
    not_run: str | None  # why it is shown and not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def is_file(self) -> bool:
        return self.title is not None and self.not_run is None

    @property
    def runs(self) -> bool:
        return self.not_run is None and self.title is None and self.language in RUNNABLE


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks in order (indented ones too: in lists, admonitions, tabs)."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].startswith(indent + fence[0] * len(fence))
            and not lines[j].strip().strip(fence[0])
        ):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
        not_run = _NOT_RUN.match(previous)
        title = _TITLE.search(info)
        language = info.strip("{} .").split(" ")[0].split("{")[0] if info else ""
        found.append(
            Block(
                page=page,
                line=i + 1,
                language=language,
                title=title["title"] if title else None,
                code="\n".join(body) + "\n",
                not_run=not_run["why"] if not_run else None,
            )
        )
        i = j + 1
    return found


def pages() -> list[Path]:
    """Every page of the site, and the README."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
