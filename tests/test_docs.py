"""README and the docs pages agree with the code: `gradmap --help` and every command's `--help`, the
generated tables and their results files, the site's navigation, and the figures README states.

Torch-free where it can be (the slim venv runs it): the checks that render a table needing torch,
torchvision or transformers skip with the reason when those are missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import click
import pytest

from gradmap.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def _load(path: Path, name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def update_docs():
    return _load(ROOT / "tools" / "update_docs.py", "_docs_tools_update_docs")


@pytest.fixture(scope="module")
def report():
    return _load(ROOT / "bench" / "_report.py", "_report")


# --- gradmap --help and the pages ---------------------------------------------------------------------------------


def _commands(group: click.Group) -> dict[str, click.Command]:
    ctx = click.Context(group)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def _gradmap_lines() -> list[tuple[str, str]]:
    """(where, the text after ``gradmap``) for every gradmap command line in README and docs/: the
    lines of code blocks (a synopsis's continuation lines joined to it, comments dropped) and inline
    code spans that start with ``gradmap``. The generated command-line reference is left out (it is
    click's own output, checked whole below)."""
    found = []
    for page in PAGES:
        if page.name == "cli.md":
            continue
        text = page.read_text()
        in_block = False
        block_lines: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            where = f"{page.relative_to(ROOT)}:{number}"
            if in_block:
                code = re.split(r"\s#\s|^#", line)[0].rstrip()
                if block_lines and re.match(r"^\s+\[", code):  # a synopsis continued on the next line
                    block_lines[-1] = (block_lines[-1][0], block_lines[-1][1] + " " + code.strip())
                    continue
                match = re.search(r"(?:^|[\s/])gradmap\s+(\S.*)$", code)
                if match:
                    block_lines.append((where, match.group(1)))
                continue
            if block_lines:
                found += block_lines
                block_lines = []
            found += [(where, span) for span in re.findall(r"`(?:\.venv/bin/)?gradmap ([^`]+)`", line)]
        found += block_lines
    return found


def _is_placeholder(value: str) -> bool:
    """NAME, INDEX, MODEL.onnx, ...: what a synopsis shows in place of a value."""
    return value.endswith(("...", "…")) or any(c.isupper() for c in value) or value.startswith(("$", "<"))


def test_every_command_has_a_row_in_readmes_command_table():
    text = README.read_text()
    rows = re.findall(r"^\| `gradmap ([a-z-]+)[^|]*\|", text, re.M)
    assert rows, "README has no command table"
    assert sorted(set(rows)) == sorted(_commands(cli)), \
        f"README's command table lists {sorted(set(rows))}, `gradmap --help` lists {sorted(_commands(cli))}"


def test_every_gradmap_line_names_real_commands_options_and_choices():
    lines = _gradmap_lines()
    assert len(lines) > 30, f"only {len(lines)} gradmap lines found: the parser missed them"
    problems = []
    commands = _commands(cli)
    for where, rest in lines:
        tokens = rest.split()
        if tokens[0] in ("--help", "-h", "--version") or _is_placeholder(tokens[0]):  # `gradmap COMMAND --help`
            continue
        command = commands.get(tokens[0])
        if command is None:
            problems.append(f"{where}: `gradmap {tokens[0]}` is no command ({', '.join(commands)})")
            continue
        path = f"gradmap {tokens[0]}"
        rest_tokens = tokens[1:]
        if isinstance(command, click.Group):  # `cache list | clear [--stale]`: every bare word a subcommand
            subs = _commands(command)
            words = []
            while rest_tokens and not rest_tokens[0].lstrip("[").startswith("-"):
                word = rest_tokens.pop(0)
                if word not in ("|", "/"):
                    words.append(word)
            for word in words:
                if word not in subs:
                    problems.append(f"{where}: `{path} {word}` is no command ({', '.join(subs)})")
            # the options follow the last subcommand named (`cache list | clear [--stale]`)
            command = subs.get(words[-1], command) if words else command
            path += f" {words[-1]}" if words else ""
        problems += _check_options(where, path, command, rest_tokens)
    assert not problems, "\n".join(problems)


def _check_options(where: str, path: str, command: click.Command, tokens: list[str]) -> list[str]:
    params = {opt: p for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    params.update({"-h": None, "--help": None})
    problems = []
    for i, token in enumerate(tokens):
        bare = token.strip("[](),.;")
        if not bare.startswith("-") or bare in ("-", "--") or re.match(r"^-\d", bare):
            continue
        for name in bare.split("/"):  # --equalize/--no-equalize
            name = name.split("=")[0]
            if name not in params:
                problems.append(f"{where}: `{path}` has no option {name}")
                continue
            param = params[name]
            if param is None or param.is_flag or i + 1 >= len(tokens):
                continue
            value = tokens[i + 1]
            in_synopsis = token.startswith("[") and value.endswith("]") and not token.endswith("]")
            value = value.strip("[](),;")
            if value.startswith("-"):
                continue
            alternatives = [v for v in value.split("|") if not _is_placeholder(v)]
            if isinstance(param.type, click.Choice):
                for v in alternatives:
                    if v not in param.type.choices:
                        problems.append(f"{where}: `{path} {name} {v}`: {v!r} is not one of {list(param.type.choices)}")
            elif in_synopsis and "|" not in value and alternatives and param.default is not None \
                    and not callable(param.default) and not param.multiple:
                if str(param.default).rstrip("/") != value.rstrip("/"):
                    problems.append(f"{where}: `{path} [{name} {value}]` shows {value!r}, the default is "
                                    f"{param.default!r}")
    return problems


def test_the_line_checker_catches_a_wrong_option_choice_and_default():
    run = _commands(cli)["run"]
    assert _check_options("x", "gradmap run", run, ["--no-such-option"]) == ["x: `gradmap run` has no option "
                                                                              "--no-such-option"]
    assert "is not one of" in _check_options("x", "gradmap run", run, ["[--reduce", "max|mean]"])[0]
    assert "the default is 8" in _check_options("x", "gradmap run", run, ["[--batch-size", "16]"])[0]
    assert _check_options("x", "gradmap run", run, ["[--batch-size", "8]", "[--reduce", "max|sum|l2]",
                                                    "[--equalize/--no-equalize]", "--method", "NAME"]) == []


def test_readmes_methods_table_is_the_clis_method_choices():
    text = README.read_text()
    section = text.split("## Methods", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    rows = [line.split("|")[1:-1] for line in table[2:]]  # after the header and its separator
    names = [re.findall(r"`([^`]+)`", cells[1])[0] for cells in rows]
    run = _commands(cli)["run"]
    method = next(p for p in run.params if p.name == "method")
    assert names == list(method.type.choices), f"README's methods {names}, gradmap run --method {method.type.choices}"
    export = _commands(cli)["export"]
    for cells in rows:
        for option in re.findall(r"`(--[^`]+)`", cells[2]):
            assert not _check_options("README methods table", "gradmap export", export, option.split()), option


def test_the_command_line_reference_is_what_the_commands_print(update_docs, report):
    text = (DOCS / "cli.md").read_text()
    assert report.section_body(text, "cli") == update_docs.cli_section() + "\n", \
        "docs/cli.md is out of date with gradmap's commands: run python tools/update_docs.py"
    for path, _ in update_docs.help_texts():
        assert f"\n## {path}\n" in text, f"docs/cli.md has no section for `{path}`"


def test_readme_and_ci_give_the_same_two_set_up_commands():
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/gradmap demo" in text
    assert "bash .ci/run" in text
    slim_install = ci.index('"$CI_DIR/slim/bin/pip" install -q \'.[test]\'')
    assert "slim/bin/gradmap demo" in ci[slim_install:], ".ci/run no longer runs gradmap demo in the slim venv"
    assert "mkdocs\" build --strict" in ci, ".ci/run no longer builds the docs with warnings as errors"


# --- generated tables ------------------------------------------------------------------------------------------------


def _generators() -> list[Path]:
    return sorted(p for p in [*ROOT.glob("bench/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("models/*.py")]
                  if "\ndef sections(" in p.read_text())


@pytest.mark.parametrize("script", _generators(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_generated_table_is_what_its_script_renders_from_the_results_file(script, update_docs, report):
    try:
        module = _load(script, script.stem if script.parent.name == "bench"
                       else f"_docs_{script.parent.name}_{script.stem}")
        sections = update_docs.rendered(module)
    except ImportError as e:  # the slim venv: a table whose rendering needs the export stack
        pytest.skip(f"rendering needs {e.name}")
    stale = report.check_sections(module.PAGE, sections)
    assert not stale, (f"docs/{module.PAGE}: {stale} differ from what {script.relative_to(ROOT)} renders from its "
                       f"results file: run `python {script.relative_to(ROOT)} --tables-only`")
    for body in sections.values():
        assert "Ran on: " in body, f"{script.relative_to(ROOT)}: a table header without the machine it ran on"
    if hasattr(module, "readme_sections"):
        stale = report.check_sections(report.README, update_docs.readme_rendered(module))
        assert not stale, (f"README.md: {stale} differ from what {script.relative_to(ROOT)} renders from its results "
                           f"file: run `python {script.relative_to(ROOT)} --tables-only`")


def test_the_run_index_is_current(report):
    assert report.check_sections(report.INDEX_PAGE, {report.INDEX_SECTION: report.runs_section()}) == [], \
        "docs/benchmarks.md's run index is out of date: run python tools/update_docs.py"


def test_every_script_that_records_results_uses_the_report_module():
    print_only = {"ab_speed.py", "export_baseline.py", "first_runs.py", "profile_nodes.py", "pytorch_recipe.py",
                  "make_figures.py", "web_screenshot.py", "mkdocs_hooks.py",
                  "make_onnx_fixtures.py", "make_keras_fixtures.py",  # write test fixtures, not results
                  "gpu_carry.py",  # downloads what bench/gpu/run.sh needs on a machine without network
                  "attention_reference.py"}  # the papers' attention rules, imported by a bench and the tests
    scripts = [*ROOT.glob("bench/*.py"), *ROOT.glob("tools/*.py"), ROOT / "models" / "evaluate_demo.py"]
    for script in [s for s in scripts if s.name != "_report.py"]:
        source = script.read_text()
        if script.name in print_only:
            assert "bench/results" not in source and "RESULTS" not in source, \
                f"{script.name} records results: give it bench/_report.py's flags and metadata"
            continue
        assert "import _report" in source, f"{script.relative_to(ROOT)} does not use bench/_report.py"
        for leftover in ("update_readme", "README.md", "platform.processor", "--readme-only\""):
            assert leftover not in source, f"{script.relative_to(ROOT)} still has its own {leftover!r}"


# --- the site --------------------------------------------------------------------------------------------------------


def test_every_docs_page_is_in_the_sites_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config.split("\nnav:", 1)[1]
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, re.M))
    pages = {p.name for p in DOCS.glob("*.md")} | {"index.md"}
    assert pages == listed, f"pages not in mkdocs.yml's nav: {sorted(pages - listed)}; " \
                            f"listed but missing: {sorted(listed - pages)}"


def test_readme_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_the_site_home_page_is_readme_with_site_relative_links():
    hooks = _load(ROOT / "tools" / "mkdocs_hooks.py", "_docs_mkdocs_hooks")
    home = hooks.home_page(README.read_text())
    assert "](docs/" not in home and "](running.md)" in home and "](figures/demo_figure.png)" in home


# --- figures README states ----------------------------------------------------------------------------------------


def _results(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def test_readmes_figures_are_those_of_the_results_files_it_cites(report):
    text = " ".join(README.read_text().split())
    sizes = {r["venv"]: r["bytes"] / 2 ** 20 for r in _results("venv_sizes.json")["rows"]}
    claim = f"{sizes['runtime']:.0f} MB against {sizes['export']:.0f} MB"
    assert claim in text and "bench/results/venv_sizes.json" in text, claim
    # the speed, methods and memory lines are generated sections, checked against their results files
    # by test_each_generated_table_is_what_its_script_renders_from_the_results_file
    raw = README.read_text()
    for name, results in (("speed-summary", "speed.json"), ("methods-summary", "methods.json"),
                          ("memory-summary", "memory.json")):
        body = report.section_body(raw, name)
        assert body and f"bench/results/{results}" in body, f"README.md has no generated {name} citing {results}"
