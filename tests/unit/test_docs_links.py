"""Every relative link and image in README.md and docs/*.md points at a file (and heading) that exists.

The README is a front door that sends readers to docs/<capability>.md, the node help pages and the
example workflows; a renamed file or heading would otherwise leave a dead link unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Heading ids of a Markdown page (duplicates get GitHub's -1, -2 suffixes)."""
    seen: dict[str, int] = {}
    ids = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        ids.add(anchor if count == 0 else f"{anchor}-{count}")
        seen[anchor] = count + 1
    return ids


def relative_links(page: Path) -> list[str]:
    """Link targets of a page outside code blocks, without web addresses."""
    targets = LINK.findall(FENCE.sub("", page.read_text()))
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with id {anchor!r} in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_github_anchor_matches_githubs_rules() -> None:
    assert github_anchor("Train LoRA (SD1.5/SDXL)") == "train-lora-sd15sdxl"
    assert github_anchor("Where an 8K RRDB frame's GPU time goes") == "where-an-8k-rrdb-frames-gpu-time-goes"
    assert github_anchor("LoHa / LoKr files") == "loha--lokr-files"
    assert github_anchor("With `torch.compile`") == "with-torchcompile"
    assert github_anchor("The `hit_residual` input") == "the-hit_residual-input"
