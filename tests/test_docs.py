"""The docs a newcomer reads stay true to the code: the README is short and its test command is CI's,
every relative link resolves, and each verb's page names every option `dlopt VERB --help` has."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest

from dlopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# the page of each verb (gate's is the CI guide)
PAGES = {"export": "export.md", "quantize": "quantize.md", "eval": "eval.md", "bench": "bench.md",
         "gate": "ci-gate.md", "package": "package.md", "verify": "verify.md", "keygen": "keygen.md",
         "prune": "prune.md", "distill": "distill.md", "optimize": "optimize.md", "run": "run.md",
         "cache": "cache.md", "models": "models.md"}
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _verbs() -> list[str]:
    return main.list_commands(click.Context(main))


def test_the_readme_is_at_most_200_lines_and_its_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci.split("# --- the README's test command, verbatim ---", 1)[1]
    assert "```bash\nbash scripts/test.sh\n```" in readme
    assert "pip install dlopt\n" not in readme and "`pip install dlopt`" not in readme  # not on PyPI


def test_every_verb_has_a_page_and_a_row_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert sorted(_verbs()) == sorted(PAGES)
    for verb, page in PAGES.items():
        assert (DOCS / page).is_file(), page
        assert f"(docs/{page})" in readme and f"`dlopt {verb}" in readme, verb


@pytest.mark.parametrize("verb", sorted(PAGES))
def test_each_verb_page_names_every_option_of_its_help(verb):
    text = (DOCS / PAGES[verb]).read_text()
    command = main.get_command(click.Context(main), verb)
    commands = list(command.commands.values()) if isinstance(command, click.Group) else [command]
    missing = sorted({option for c in commands for p in c.params if isinstance(p, click.Option)
                      for option in p.opts + p.secondary_opts
                      if option.startswith("--") and option != "--help" and f"`{option}`" not in text})
    assert not missing, f"docs/{PAGES[verb]} does not name {missing}"


def test_relative_links_of_the_readme_and_docs_resolve():
    broken = []
    for page in [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_results_label_every_section_with_its_cpu_and_date():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert len(sections) >= 8
    for title in sections:
        # the CPU by vendor line and generation (EPYC Zen 4, Xeon with AMX, ...), then the date
        assert re.search(r"\(((EPYC|Xeon)[^,]*), 20\d\d-\d\d-\d\d\)$", title), title


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(value, name):
                return False
            value = getattr(value, name)
        return True
    return False


def test_the_python_api_page_names_only_what_exists():
    """Every `dlopt.module.name` and `api.name` the page shows is importable: a rename fails here."""
    text = (DOCS / "python-api.md").read_text()
    names = set(re.findall(r"\b(dlopt(?:\.\w+)+)", text))
    names |= {f"dlopt.api.{n}" for n in re.findall(r"\bapi\.(\w+)", text)}
    assert len(names) > 20
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, missing
