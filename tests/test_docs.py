"""The documentation: the MkDocs site builds strictly (a broken link or anchor fails), every page is in its
navigation, and the README (outside the site) links only to files that exist and stays a landing page."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra; CI installs it and runs this test")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "METHOD" / "index.html").is_file()


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    missing = [page for page in pages if not re.search(rf":\s*{re.escape(page)}\s*$", nav, re.MULTILINE)]
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {missing}"


def _relative_links(markdown: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", markdown)
    return [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    broken = [link for link in _relative_links(readme) if not (ROOT / link.split("#")[0]).exists()]
    assert not broken, f"README links to missing files: {broken}"


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README is {len(lines)} lines: move reference material into docs/"


def test_sources_cite_the_paper_and_the_projects_docs_not_history():
    """Comments and docs say why, citing the paper or docs/ (METHOD.md has the constants): an issue number is
    history (git has it), and an outside spec is a document the project does not contain."""
    pattern = re.compile(r"\b[Ii]ssues? \d+\b|\bSPEC\b")
    suffixes = {".py", ".md", ".sh", ".cu", ".h", ".cpp", ".txt", ".toml", ".yml"}
    skipped = {ROOT / "tests" / "test_docs.py"}
    offenders = []
    for folder in ("cinemo_rt", "export", "kernels", "benchmarks", "tests", "docs", "configs", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if (path.is_file() and (path.suffix in suffixes or path.name == "run") and path not in skipped
                    and "results" not in path.parts and not path.is_symlink()
                    and "_kernels" not in path.relative_to(ROOT).parts):
                for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if pattern.search(line):
                        offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    for name in ("README.md", "CMakeLists.txt", "pyproject.toml"):
        offenders += [f"{name}: {line.strip()[:80]}" for line in (ROOT / name).read_text().splitlines()
                      if pattern.search(line)]
    assert not offenders, "\n".join(offenders)
