"""The documentation: the committed recipe reference is current and names every field of the
schema, the site builds strictly, its recipe reference renders as tables in headless Chromium, and
the README stays short."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from raytune_ft import docs_reference
from raytune_ft.docs_reference import Recipe, render
from raytune_ft.strategies import STRATEGIES
from raytune_ft.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "recipe-reference.md"
CHROMIUM = shutil.which("chromium")


def schema_paths(schema: dict, prefix: str = "", defs: dict | None = None):
    """Every field's dotted path, read from the JSON schema pydantic generates (not the models'
    annotations, which the generator walks): a list item is <i>, a dict value <name>."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    for option in schema.get("anyOf", []):
        yield from schema_paths(option, prefix, defs)
    if "items" in schema:
        yield from schema_paths(schema["items"], f"{prefix}.<i>", defs)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_paths(schema["additionalProperties"], f"{prefix}.<name>", defs)
    for name, field in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield path
        yield from schema_paths(field, path, defs)


def test_the_committed_recipe_reference_is_current():
    committed, fresh = REFERENCE.read_text(), render()
    if committed != fresh:
        diff = list(difflib.unified_diff(committed.splitlines(), fresh.splitlines(), "committed", "render()", lineterm="", n=0))
        pytest.fail("docs/recipe-reference.md is stale: run `make docs` and commit it\n" + "\n".join(diff[:20]))


def test_the_recipe_reference_names_every_field_of_the_schema():
    page = REFERENCE.read_text()
    paths = list(schema_paths(Recipe.model_json_schema()))
    for task in TASKS.values():
        paths += schema_paths(task.Options.model_json_schema(), "task")
    for strategy in STRATEGIES.values():  # each strategy owns its options after the schema refactor
        if hasattr(strategy, "Options"):
            paths += schema_paths(strategy.Options.model_json_schema(), "strategy")
    assert len(paths) > 150 and "retention.references.<i>.data.columns" in paths and "tune.space.<name>.grid" in paths
    missing = [path for path in paths if f"| `{path}` |" not in page]
    assert not missing, f"not in docs/recipe-reference.md (run `make docs`): {missing}"


def test_a_strategy_with_its_own_options_gets_a_table(monkeypatch):
    """After the schema refactor each strategy owns an Options model; the page lists its fields."""
    class Options(BaseModel):
        spread: float = Field(0.5, gt=0, le=1, description="how far it reaches")

    monkeypatch.setitem(STRATEGIES, "tested", type("Tested", (), {"name": "tested", "Options": Options}))
    page = docs_reference.render()
    assert "### `strategy.method: tested`" in page
    assert "| `strategy.spread` | float | `0.5` | > 0, ≤ 1 | how far it reaches |" in page


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built as `make docs` builds it."""
    directory = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(directory)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    return directory


def test_the_site_builds_strictly_with_every_page(site):
    pages = sorted(path.stem for path in (ROOT / "docs").glob("*.md"))
    assert pages and all((site / ("" if page == "index" else page) / "index.html").is_file() for page in pages)
    assert (site / "benchmarks" / "MEASUREMENTS" / "index.html").is_file()
    assert (site / "benchmarks" / "results" / "retention.png").is_file()  # shown on the retention page


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make install installs it)")
def test_the_recipe_reference_renders_its_tables_in_headless_chromium(site, tmp_path):
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}"]
    page = (site / "recipe-reference" / "index.html").as_uri()
    dom = subprocess.run([*browser, "--virtual-time-budget=10000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=180).stdout
    tables = re.findall(r"<table>.*?</table>", dom, flags=re.S)
    headings = REFERENCE.read_text().count("| field | type | default | allowed | description |")
    assert len(tables) == headings > 30
    assert 'class="md-typeset__table"' in dom  # Material's script ran and wrapped the tables
    rows = re.findall(r"<tr>\s*<td><code>([^<]+)</code></td>", dom)
    assert "train.lr" in rows and "retention.references.&lt;i&gt;.kind" in rows and "task.heads.&lt;name&gt;.weight" in rows
    assert len(rows) > 150


def test_the_readme_is_read_in_five_minutes_and_its_links_hold():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 16_384, f"README.md is {len(readme)} bytes; move reference material to docs/"
    assert b"make demo" in readme and b"make test" in readme
    links = re.findall(r"\]\(([^)#\s]+)", readme.decode())
    assert "docs/index.md" in links and not [link for link in links if not (ROOT / link).exists()]
