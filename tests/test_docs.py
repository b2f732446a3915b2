"""The documentation holds together: every relative link and anchor in README.md, docs/ and the record
folders' READMEs leads somewhere, every docs page is linked from the README, the README stays short, and
the README's two commands are the ones CI and the scripts run."""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)|!\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
README_MAX_LINES = 250


def pages() -> list[Path]:
    records = sorted((REPO / "records").glob("*/*/README.md"))
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *records]


def anchor_of(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = anchor_of(match.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")  # GitHub numbers repeats
            seen[slug] = seen.get(slug, 0) + 1
    return found


def links(text: str) -> list[str]:
    """The relative targets of a Markdown page's links and images, outside fenced code and inline code."""
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    targets = [m.group(2) or m.group(4) for m in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: are not checked here


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page.read_text()):
        path, _, anchor = target.partition("#")
        goal = (page.parent / path).resolve() if path else page
        if not goal.exists():
            problems.append(f"{page.relative_to(REPO)}: {target}: no such file")
        elif anchor and goal.suffix == ".md" and anchor not in anchors(goal.read_text()):
            problems.append(f"{page.relative_to(REPO)}: {target}: no heading with that anchor in {goal.name}")
    return problems


def test_every_relative_link_and_anchor_leads_somewhere():
    problems = [problem for page in pages() for problem in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part: one\n")
    good = "[a](docs/a.md) [part](docs/a.md#its-part-one) [top](#top) ![x](docs/a.md)\n\n# Top\n"
    (tmp_path / "README.md").write_text(good)
    assert broken_links(tmp_path / "README.md") == []
    for bad in ("[a](docs/b.md)", "[part](docs/a.md#its-part)", "[here](#nowhere)", "![x](docs/b.svg)"):
        (tmp_path / "README.md").write_text(good + bad + "\n")
        assert len(broken_links(tmp_path / "README.md")) == 1, bad
    (tmp_path / "README.md").write_text(good + "```\n[a](docs/b.md)\n```\n`[a](docs/b.md)`\n")
    assert broken_links(tmp_path / "README.md") == []  # code is not a link


def test_every_docs_page_is_linked_from_the_readme_which_stays_short():
    readme = (REPO / "README.md").read_text()
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(readme)}
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    assert len(readme.splitlines()) <= README_MAX_LINES, "README.md is for a newcomer: move the detail to docs/"


def commands_of(section: str) -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_readmes_two_commands_are_what_ci_and_the_scripts_run():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    assert commands_of(section) == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "bash scripts/test.sh", ".ci/run must end by running the README's test command"
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    assert re.search(r"^exec \.venv/bin/python -m pytest .*\btests\b", test_sh, re.MULTILINE), \
        "scripts/test.sh must run the whole tests/ folder"
    assert "scripts/demo.py" in (REPO / "scripts" / "demo.sh").read_text()


def test_the_quick_tier_names_only_tests_that_exist_and_test_sh_selects_it():
    """conftest's slow list names real files and tests (a renamed test would otherwise slip into the quick
    tier unnoticed), and `scripts/test.sh --quick` is the "not slow" selection, the plain command all tests."""
    import ast
    import conftest
    for file_name, names in conftest.SLOW_TESTS.items():
        path = REPO / "tests" / file_name
        assert path.is_file(), f"conftest.SLOW_TESTS names {file_name}, which is not in tests/"
        defined = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
        missing = set() if names == "all" else {name.split("[")[0] for name in names} - defined
        assert not missing, f"conftest.SLOW_TESTS names tests {file_name} does not define: {sorted(missing)}"
    assert conftest.is_slow("test_x.py", "test_y", "test_y[1]", ["tmp_path", "trained"])
    assert not conftest.is_slow("test_x.py", "test_y", "test_y[1]", ["tmp_path"])
    muon = "test_muon_orthogonalized_update_has_singular_values_near_one"
    assert conftest.is_slow("test_model_and_quant.py", muon, muon + "[shape3]", [])
    assert not conftest.is_slow("test_model_and_quant.py", muon, muon + "[shape0]", [])
    for file_name, value in conftest.SLOW_PARAMS.items():  # a parametrized fixture's slow variant, and only it
        assert conftest.is_slow(file_name, "test_y", f"test_y[{value}]", [], {"official": value})
        assert not conftest.is_slow(file_name, "test_y", "test_y[other]", [], {"official": "other"})
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    assert re.search(r'--quick.*\n(.*\n)*?\s*exec .*pytest -q -m "not slow" tests "\$@"', test_sh)
    assert test_sh.rstrip().splitlines()[-1] == 'exec .venv/bin/python -m pytest -q tests "$@"'


def test_the_readmes_settings_table_names_real_settings_with_their_defaults():
    """Each row of the README's settings table: every name is a setting of train_gpt.Settings or
    eval_final.EvalSettings, and the default shown is the one in the code (bools as 0/1, `auto` each)."""
    import dataclasses
    import eval_final
    import train_gpt
    defaults = {f.name.upper(): f.default for f in dataclasses.fields(eval_final.EvalSettings)}
    defaults.update({f.name.upper(): f.default for f in dataclasses.fields(train_gpt.Settings)})
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The settings changed most", 1)[1].split("\n## ", 1)[0]
    rows = [row.split(" | ") for row in section.splitlines() if row.startswith("| `")]
    assert len(rows) >= 15
    shown_as = {"": "a fresh uuid", "True": "1", "False": "0"}  # the code's default -> as the table shows it
    for names_cell, default_cell, _ in rows:
        names = re.findall(r"`([A-Z_0-9]+)`", names_cell.strip("| "))
        shown = [value.strip().strip("`") for value in default_cell.split(", ")]
        if default_cell.strip() == "`auto` each":
            shown = ["auto"] * len(names)
        assert len(shown) == len(names), names_cell
        for name, value in zip(names, shown):
            assert name in defaults, f"README's settings table names {name}, which no script reads"
            code = defaults[name]
            code_text = shown_as.get(str(code), str(code))
            matches = value == code_text or (not isinstance(code, (bool, str)) and float(value) == float(code))
            assert matches, f"README shows {name}={value}; the code's default is {code!r}"
