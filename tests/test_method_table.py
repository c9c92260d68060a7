"""The method table (gradmap/contract.py, METHOD_TABLE) is the one place that knows the methods.

- no Python, JavaScript or HTML file under gradmap/ but the table spells a method's name;
- adding a method is a row in the table and its implementation (Python, and JavaScript when the page
  computes it): a copy of the package with exactly those edits runs the new method from ``gradmap run``
  (its setting an option, checked against the table's range), ``gradmap info``, ``gradmap evaluate``,
  the Python API's request check and ``gradmap web``'s model.json;
- every row names implementations that exist, settings validate alike in the table, the CLI and the
  page's JavaScript, and the runtime's shortcut for the default method reads what the table says.
"""

from __future__ import annotations

import ast
import filecmp
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import LINEAR_MODEL
from gradmap import contract

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "gradmap"
TABLE = Path("gradmap/contract.py")
DEMO = REPO / "models" / "demo"


def name_literals(root: Path, names: list[str]) -> list[str]:
    """``file:line: 'name'`` for every string literal under ``root/gradmap`` (Python, JavaScript,
    HTML) that is exactly a method name, the table's file aside. In gradmap/graph and gradmap/export,
    which speak of backpropagation rules and never of methods, a rule's name is a rule's name
    (``vanilla``, ``deconvnet`` are both); in ``__all__``, a name is a function's."""
    found = []
    rules = set(contract.BACKPROP_OUTPUTS)
    quoted = re.compile(r"""(["'`])(%s)\1""" % "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
    for path in sorted((root / "gradmap").rglob("*")):
        relative = path.relative_to(root)
        if relative == TABLE or path.suffix not in (".py", ".js", ".html"):
            continue
        wanted = set(names) - (rules if relative.parts[1] in ("graph", "export") else set())
        text = path.read_text()
        if path.suffix == ".py":
            tree = ast.parse(text)
            exported = {id(c) for node in ast.walk(tree) if isinstance(node, ast.Assign)  # __all__ names functions
                        and any(getattr(t, "id", None) == "__all__" for t in node.targets) for c in ast.walk(node.value)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in wanted \
                        and id(node) not in exported:
                    found.append(f"{relative}:{node.lineno}: {node.value!r}")
        else:
            for number, line in enumerate(text.splitlines(), 1):
                found += [f"{relative}:{number}: {m.group(0)}" for m in quoted.finditer(line) if m.group(2) in wanted]
    return found


def test_no_file_under_gradmap_spells_a_method_name():
    offenders = name_literals(REPO, list(contract.METHODS))
    assert not offenders, "method names outside the method table (read them from contract.METHOD_TABLE):\n" + \
        "\n".join(offenders)


def test_the_check_finds_a_spelled_name(tmp_path):
    """The check above can fail: a copy of a runtime file and of the page with a name spelled is caught."""
    (tmp_path / "gradmap" / "runtime").mkdir(parents=True)
    (tmp_path / "gradmap" / "web").mkdir()
    (tmp_path / "gradmap" / "runtime" / "x.py").write_text('METHOD = "grad-cam++"\nOTHER = "grad-cam+"\n')
    (tmp_path / "gradmap" / "web" / "x.js").write_text('if (method === "smoothgrad") run();\n')
    (tmp_path / "gradmap" / "graph").mkdir()
    (tmp_path / "gradmap" / "graph" / "x.py").write_text('RULE = "deconvnet"\nMETHOD = "grad-cam"\n')
    assert name_literals(tmp_path, list(contract.METHODS)) == [
        "gradmap/graph/x.py:2: 'grad-cam'", "gradmap/runtime/x.py:1: 'grad-cam++'",
        'gradmap/web/x.js:1: "smoothgrad"']


# -- adding a method ---------------------------------------------------------------------------
NEW = "scaled-gradient"
#: Every place that adding a method the page computes touches, and what goes there.
PLACES = {
    "gradmap/contract.py": "the method's row in METHOD_TABLE",
    "gradmap/runtime/scaled.py": "its runtime implementation (a new module, or a function in an existing one)",
    "gradmap/web/methods.js": "its page implementation (only for a method the page computes)",
}
ROW = f'''    Method("{NEW}", KIND_GRADIENT, "the gradient times a constant (a test's method)", _GRADIENT_OUTPUTS,
           "gradmap.runtime.scaled:scaled_gradient_method", web="scaledGradient",
           settings=(Setting("scale", "float", 2.0, "factor on the gradient.", minimum=0.5, maximum=10),)),
'''
PYTHON = '''"""A method added by a test: the gradient times the method's ``scale`` setting."""

from gradmap.runtime.methods import Attribution, gradient_function, vanilla


def scaled_gradient_method(model, spec, images, targets, *, batch_size=16):
    plain = vanilla(gradient_function(model, batch_size=batch_size), images, targets)
    return Attribution(plain.values * spec.scale, plain.target_index, plain.logits)
'''
JAVASCRIPT = '''
/** The gradient times the method's scale setting (a test's method). */
export async function scaledGradient(ctx, method, tensor, settings) {
  const a = await modelGradient(ctx, method, tensor);
  return { ...a, values: Float32Array.from(a.values, (g) => g * settings.scale) };
}
'''


def _add_method(root: Path) -> None:
    shutil.copytree(PACKAGE, root / "gradmap", ignore=shutil.ignore_patterns("__pycache__"))
    table = root / TABLE
    lines = table.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("METHOD_TABLE"))
    end = next(i for i in range(start, len(lines)) if lines[i] == ")\n")  # the table's closing line
    table.write_text("".join(lines[:end]) + ROW + "".join(lines[end:]))
    (root / "gradmap" / "runtime" / "scaled.py").write_text(PYTHON)
    with open(root / "gradmap" / "web" / "methods.js", "a") as f:
        f.write(JAVASCRIPT)


def _changed(a: Path, b: Path, relative: Path = Path()) -> list[str]:
    """Files that differ between the trees ``a`` and ``b`` (added, removed or changed)."""
    compared = filecmp.dircmp(a, b, ignore=["__pycache__"])
    changed = [str(relative / name) for name in (*compared.left_only, *compared.right_only, *compared.diff_files)]
    for name in compared.common_dirs:
        changed += _changed(a / name, b / name, relative / name)
    return sorted(changed)


@pytest.fixture(scope="module")
def with_new_method(tmp_path_factory):
    root = tmp_path_factory.mktemp("added")
    _add_method(root)
    return root


def _gradmap(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "gradmap.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)


def test_adding_a_method_touches_the_table_and_its_implementation_only(with_new_method, photo_files, tmp_path):
    root = with_new_method
    assert _changed(PACKAGE, root / "gradmap") == sorted(str(Path(p).relative_to("gradmap")) for p in PLACES)
    assert name_literals(root, [*contract.METHODS, NEW]) == [], "the new name is spelled outside the table"
    where = subprocess.run([sys.executable, "-c", "import gradmap; print(gradmap.__file__)"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(root)}, cwd=root).stdout
    assert where.startswith(str(root)), f"the copy is not the gradmap that runs: {where}"

    # gradmap info: the model has it
    info = _gradmap(root, "info", str(LINEAR_MODEL), "--json")
    assert info.returncode == 0, info.stderr
    assert NEW in json.loads(info.stdout)["methods"]

    # gradmap run: the method and its setting, whose range comes from the table
    picture = str(photo_files[0])
    runs = {}
    for method, extra in (("vanilla", []), (NEW, ["--scale", "3"])):
        done = _gradmap(root, "run", str(LINEAR_MODEL), picture, "--out", str(tmp_path / method), "--method", method,
                        "--format", "npy", "--json", *extra)
        assert done.returncode == 0, done.stderr
        (record,) = json.loads(done.stdout)["images"]
        assert record["maps"][0]["method"] == method
        runs[method] = np.load(record["maps"][0]["files"]["gradient"])
    np.testing.assert_allclose(runs[NEW], 3 * runs["vanilla"], rtol=1e-6)
    bad = _gradmap(root, "run", str(LINEAR_MODEL), picture, "--out", str(tmp_path / "bad"), "--method", NEW,
                   "--scale", "20")
    assert bad.returncode == 2 and "Invalid value for '--scale'" in bad.stderr, bad.stderr
    assert "--scale FLOAT RANGE" in _gradmap(root, "run", "--help").stdout

    # gradmap evaluate: measured like any method, its settings reported
    out = tmp_path / "evaluation.json"
    done = _gradmap(root, "evaluate", str(DEMO / "shapes.onnx"), "--data", str(DEMO / "eval_set.npz"), "--limit", "3",
                    "--curve-steps", "4", "--random-repeats", "1", "--method", NEW, "--scale", "4", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["methods"][NEW]["parameters"] == {"scale": 4.0, "modifier": "auto"}

    # a request's settings are checked against the table (gradmap serve's validation)
    script = textwrap.dedent(f"""
        from gradmap.contract import MethodSettingError
        from gradmap.runtime.methods import MethodSpec
        assert MethodSpec.from_request({NEW!r}, {{"scale": "2.5"}}).scale == 2.5
        for settings in ({{"scale": 11}}, {{"samples": 3}}):
            try:
                MethodSpec.from_request({NEW!r}, settings)
            except MethodSettingError as e:
                print("refused:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert f"refused: {NEW} setting 'scale' must be a number in [0.5, 10], got 11" in done.stdout
    assert f"refused: {NEW} has no setting 'samples'" in done.stdout

    # gradmap web: the page offers it, with its row (settings, page implementation) in model.json
    done = _gradmap(root, "web", str(LINEAR_MODEL), "--out", str(tmp_path / "site"))
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "site" / "model.json").read_text())
    assert NEW in config["methods"]
    (row,) = [m for m in config["method_table"] if m["name"] == NEW]
    assert row["web"] == "scaledGradient" and [s["name"] for s in row["settings"]] == ["scale"]
    assert "export async function scaledGradient" in (tmp_path / "site" / "methods.js").read_text()


# -- the table itself ---------------------------------------------------------------------------
def test_every_row_names_implementations_that_exist():
    from gradmap.runtime.methods import implementation

    page = (PACKAGE / "web" / "methods.js").read_text()
    exported = set(re.findall(r"^export (?:async )?function (\w+)\(", page, flags=re.M))
    for row in contract.METHOD_TABLE:
        assert callable(implementation(row.name)), f"{row.name}: {row.implementation} is not a function"
        assert row.web is None or row.web in exported, f"{row.name}: methods.js exports no function {row.web}"
        assert row.kind in contract.METHOD_KINDS and set(row.outputs) <= set(contract.OUTPUTS)
    assert exported <= {row.web for row in contract.METHOD_TABLE}, "methods.js exports a function no row names"


def test_the_default_method_reads_what_saliency_model_run_returns():
    """iter_saliency runs the default method as SaliencyModel.run (one run per batch): that is only
    right while the default row reads the plain gradient output as the model computed it."""
    row = contract.method(contract.DEFAULT_METHOD)
    assert row.outputs == (contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT)
    assert row.implementation == "gradmap.runtime.methods:model_gradient_method" and not row.settings


def test_export_options_and_supported_methods_follow_the_outputs():
    assert contract.method("guided-grad-cam").export_options == ("--backprop guided", "--cam-layer auto")
    assert contract.method("integrated-gradients").export_options == ()
    assert contract.method("attention-relevance").export_options == ("--attention",)
    full = contract.model_outputs(tuple(contract.BACKPROP_OUTPUTS), True, True)
    assert set(full) == set(contract.OUTPUTS)
    assert contract.methods_for(tuple(contract.BACKPROP_OUTPUTS), True, True) == contract.METHODS
    assert "attention-rollout" not in contract.methods_for(tuple(contract.BACKPROP_OUTPUTS), True)
    assert "guided-grad-cam" not in contract.methods_for((contract.DEFAULT_BACKPROP,), True)


@pytest.mark.parametrize("setting, value, expected", [
    ("samples", "11", 11), ("samples", 11.0, 11), ("samples", np.int64(4), 4), ("noise", "0", 0.0),
    ("noise", 0, 0.0), ("variant", "vargrad", "vargrad"), ("seed", -3, -3),
])
def test_settings_parse_and_check(setting, value, expected):
    got = contract.SETTINGS[setting].check(value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("setting, value, message", [
    ("samples", 0, "must be an integer >= 1, got 0"), ("samples", 2.5, "must be an integer >= 1"),
    ("samples", True, "must be an integer"), ("samples", "ten", "must be an integer"),
    ("noise", -0.1, "must be a number >= 0"), ("noise", float("nan"), "must be a number"),
    ("noise", None, "must be a number"), ("variant", "mean", "'mean' is not one of plain, squared, vargrad"),
    ("steps", 1, "must be an integer >= 2"),
])
def test_bad_settings_are_refused_naming_the_setting(setting, value, message):
    with pytest.raises(contract.MethodSettingError, match=re.escape(message)):
        contract.SETTINGS[setting].check(value)


def test_method_spec_settings():
    from gradmap.runtime.methods import MethodSpec

    spec = MethodSpec("smoothgrad", samples=4, steps=9)  # steps: another method's, checked and left out
    assert spec.settings == {"samples": 4, "noise": 0.15, "variant": "plain", "seed": 0, "modifier": "auto"}
    assert spec.samples == 4 and spec.method is contract.method("smoothgrad")
    with pytest.raises(AttributeError, match="has no setting 'steps'"):
        spec.steps  # noqa: B018
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(spec) == hash(MethodSpec("smoothgrad", samples=4))
    assert MethodSpec() == MethodSpec(contract.DEFAULT_METHOD) != spec
    with pytest.raises(ValueError, match="must be an integer >= 2"):
        MethodSpec("smoothgrad", steps=1)
    with pytest.raises(ValueError, match="no method has a setting 'sample'"):
        MethodSpec("smoothgrad", sample=4)
    with pytest.raises(ValueError, match="unknown method 'smoothgrads'"):
        MethodSpec("smoothgrads")
    with pytest.raises(contract.MethodSettingError, match="smoothgrad has no setting 'steps'"):
        MethodSpec.from_request("smoothgrad", {"steps": 9})


def test_cli_options_come_from_the_table():
    from gradmap import cli

    for command, choice, own in ((cli.run_command, "method", ()), (cli.evaluate_command, "method_names", ("seed",))):
        params = {p.name: p for p in command.params}
        assert tuple(params[choice].type.choices) == contract.METHODS
        for name, setting in contract.SETTINGS.items():
            if name in own:
                continue
            option = params[name]
            defaults = {s.default for m in contract.methods_using(name) for s in contract.method(m).all_settings
                        if s.name == name}
            if len(defaults) == 1:
                assert option.default == setting.default, name
            else:  # each method's own default: the option's help lists them
                assert option.default is None, name
                for m in contract.methods_using(name):
                    own_default = next(s.default for s in contract.method(m).all_settings if s.name == name)
                    assert f"{m} {own_default}" in option.help, (name, option.help)
            if setting.type == "choice":
                assert tuple(option.type.choices) == setting.choices, name
            elif setting.minimum is not None:
                assert option.type.min == setting.minimum, name


def test_cli_run_refuses_an_unsupported_method_naming_the_export_option(photo_files, tmp_path):
    from gradmap.cli import main

    result = CliRunner().invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(tmp_path / "o"),
                                       "--method", "grad-cam++"])
    assert result.exit_code == 2
    assert "does not support grad-cam++" in result.stderr and "export it with --cam-layer auto" in result.stderr


def test_the_page_checks_settings_as_the_table_does(tmp_path):
    """gradmap.js's checkSetting (the page's) against Setting.check, run in Node."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js")
    shutil.copyfile(PACKAGE / "web" / "gradmap.js", tmp_path / "gradmap.mjs")
    cases = [(name, value) for name in contract.SETTINGS for value in
             ("0", "1", "2", "2.5", "2.0", "1e3", "-1", "+3", " 4 ", "", "x", "0x10", "1_0", "inf", "nan",
                                                  "plain", "squared", "black", "none", "1e400")]
    script = textwrap.dedent("""
        import { checkSetting } from "./gradmap.mjs";
        const [settings, cases] = JSON.parse(process.argv[2]);
        console.log(JSON.stringify(cases.map(([name, value]) => {
          try { return [true, checkSetting(settings[name], value)]; } catch (e) { return [false, e.message]; }
        })));
    """)
    (tmp_path / "check.mjs").write_text(script)
    settings = {name: s.to_dict() for name, s in contract.SETTINGS.items()}
    done = subprocess.run([node, str(tmp_path / "check.mjs"), json.dumps([settings, cases])], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for (name, value), (ok, got) in zip(cases, json.loads(done.stdout)):
        try:
            expected = contract.SETTINGS[name].check(value)
        except contract.MethodSettingError:
            assert not ok, f"{name}={value!r}: the page takes {got!r}, the table refuses it"
            continue
        assert ok and got == expected, f"{name}={value!r}: the page says {got!r}, the table {expected!r}"


def test_setting_names_clash_with_no_option_and_no_page_parameter():
    from gradmap import cli

    for command in (cli.run_command, cli.evaluate_command):
        names = [p.name for p in command.params]
        assert len(names) == len(set(names)), f"{command.name}: a setting has an option's name: {sorted(names)}"
    page_parameters = set(re.findall(r"params\.(?:get|has)\(\"(\w+)\"\)", (PACKAGE / "web" / "app.js").read_text()))
    assert page_parameters >= {"image", "method", "backend", "threads"}
    assert not page_parameters & set(contract.SETTINGS), "a setting has the name of one of the page's parameters"


def test_the_docs_table_is_current():
    done = subprocess.run([sys.executable, str(REPO / "tools" / "method_table.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_table_imports_without_numpy():
    """Plain data: a server, the CLI's --help and the export all read it without the runtime's stack."""
    script = textwrap.dedent("""
        import sys
        for name in ("numpy", "onnxruntime", "PIL", "torch", "onnx"):
            sys.modules[name] = None  # importing it raises ImportError
        from gradmap import contract
        row = contract.method("smoothgrad")
        print(row.resolve({"samples": "8"})["samples"], row.to_dict()["settings"][0]["name"], len(contract.METHODS))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8", "samples", str(len(contract.METHOD_TABLE))]
