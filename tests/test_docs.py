"""The method's description under docs/: every link to a docs anchor, from the docs themselves or
from the code's comments (``docs/<file>.md#<anchor>``), names a file and an anchor that exist."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
ANCHOR = re.compile(r'<a id="([^"]+)"></a>')
CODE_LINK = re.compile(r"docs/(\w+\.md)#([\w-]+)")
DOC_LINK = re.compile(r"\]\((\w+\.md)?#([\w-]+)\)")


def _anchors() -> dict[str, set[str]]:
    return {p.name: set(ANCHOR.findall(p.read_text(encoding="utf-8"))) for p in DOCS.glob("*.md")}


def test_docs_describe_the_method_the_differences_and_the_evaluation():
    anchors = _anchors()
    assert {"method.md", "differences.md", "evaluation.md"} <= set(anchors)
    assert {f"stage-{i}" for i in range(1, 7)} | {"image-frame"} <= anchors["method.md"]
    assert {f"trap-{i}" for i in range(1, 8)} <= anchors["differences.md"]
    assert {"protocols", "proposal-ar", "per-image-ar", "keys-by-imagenet-class"} <= anchors["evaluation.md"]


def test_every_link_to_a_docs_anchor_resolves():
    anchors = _anchors()
    broken = []
    for page in DOCS.glob("*.md"):
        for target, anchor in DOC_LINK.findall(page.read_text(encoding="utf-8")):
            if anchor not in anchors.get(target or page.name, set()):
                broken.append(f"{page.name} -> {target or page.name}#{anchor}")
    sources = [REPO / "README.md", *[p for d in ("part_distillation", "tests", "tools", "configs", "sh_files")
                                     for p in (REPO / d).rglob("*") if p.suffix in (".py", ".yaml", ".sh", ".md")]]
    for path in sources:
        for target, anchor in CODE_LINK.findall(path.read_text(encoding="utf-8", errors="replace")):
            if anchor not in anchors.get(target, set()):
                broken.append(f"{path.relative_to(REPO)} -> docs/{target}#{anchor}")
    assert not broken, broken
