"""The user guide builds as a site: `mkdocs build --strict` (mkdocs.yml makes a broken link or anchor
and a page left out of the nav warnings, which strict turns into a failure), and every page is in
the nav (checked here too, so the rule does not rest on one line of mkdocs.yml)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _mkdocs():
    # mkdocs and mkdocs-material are in the test extra: a missing one fails the build, not a skip
    return [sys.executable, "-m", "mkdocs"]


def _nav_pages(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _nav_pages(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _nav_pages(value)


def _config():
    # mkdocs.yml holds no !!python tags, so the safe loader reads it
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([*_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "experiments" / "index.html").exists()  # the records, through docs/experiments


def test_experiments_are_linked_into_the_site():
    link = DOCS / "experiments"
    assert link.is_symlink() and link.resolve() == (ROOT / "experiments").resolve()


def test_every_page_is_in_the_nav():
    nav = set(_nav_pages(_config()["nav"]))
    assert all((DOCS / page).is_file() for page in nav), sorted(p for p in nav if not (DOCS / p).is_file())
    guide = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
             if p.relative_to(DOCS).parts[0] != "experiments"}
    records = {"experiments/" + p.relative_to(ROOT / "experiments").as_posix()
               for p in (ROOT / "experiments").rglob("*.md")}
    assert guide, "no docs pages found"
    assert guide | records <= nav, f"pages missing from mkdocs.yml's nav: {sorted((guide | records) - nav)}"


def test_nav_check_sees_a_missing_page(tmp_path):
    """The strict build itself fails on a page left out of the nav (not only this file's check)."""
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs", symlinks=True)
    shutil.copytree(ROOT / "experiments", copy / "experiments")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "docs" / "orphan.md").write_text("# Not in the nav\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([*_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    out = run.stderr + run.stdout
    assert run.returncode != 0 and "orphan.md" in out
    assert "not included in the \"nav\"" in out and out.count("WARNING") == 1, out


def test_readme_links_resolve():
    """README.md is read on the repository's front page, outside the site: its relative links must
    name files that exist (the site's own links are checked by the strict build)."""
    readme = (ROOT / "README.md").read_text()
    targets = [m.group(1) for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
               if not m.group(1).startswith(("http://", "https://"))]
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]
