"""The README is the user's first page and docs/ holds the guides: both must stay true."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from tools.settings_doc import render

README = (ROOT / "README.md").read_text()
GUIDES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_a_first_page() -> None:
    assert len(README.splitlines()) <= 250


def test_two_setup_commands_come_first() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "serve"], ["make", "test"]]


def test_every_route_has_a_curl() -> None:
    routes = ("/generate", ":predict", "/infer", "/openai/v1/completions", "/openai/v1/chat/completions", "/metrics")
    for route in routes:
        assert re.search(rf"curl [^\n]*{re.escape(route)}", README), route


def test_every_make_target_named_in_the_readme_exists() -> None:
    makefiles = (ROOT / "Makefile").read_text() + "".join(p.read_text() for p in (ROOT / "mk").glob("*.mk"))
    for target in set(re.findall(r"^make ([a-z-]+)", README, flags=re.M)):
        assert re.search(rf"^{re.escape(target)}:", makefiles, flags=re.M), target


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, spaces to dashes, punctuation dropped."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_readme_and_guides_resolves() -> None:
    for page in [ROOT / "README.md", *GUIDES]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: {target}"
            if anchor and resolved.suffix == ".md":
                assert anchor in _anchors(resolved.read_text()), f"{page.name}: {target}"


def test_the_settings_guide_is_generated_from_the_settings_class() -> None:
    regenerate = "run: python -m tools.settings_doc > docs/settings.md"
    assert (ROOT / "docs" / "settings.md").read_text() == render(), regenerate


def test_every_guide_is_linked_from_the_readme() -> None:
    for guide in GUIDES:
        assert f"docs/{guide.name}" in README, guide.name


def test_every_markdown_file_a_source_or_guide_names_is_in_the_repository() -> None:
    """A clone holds everything its code, tests and guides point at (no notes kept elsewhere)."""
    held = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    for folder in ("predictor", "loadtest", "tests", "tools", "deploy", "helm", "manifests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".yaml", ".tpl", ".txt"} and path.is_file():
                for name in re.findall(r"\b([A-Za-z][\w-]*\.md)\b", path.read_text(errors="replace")):
                    assert name in held, f"{path.relative_to(ROOT)} names {name}"
