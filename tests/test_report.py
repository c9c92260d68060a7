"""bench/_report.py, the plumbing every benchmark and coverage script shares: the machine record,
results files, table headers and generated sections. Torch-free (the slim venv runs it too)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("_report", ROOT / "bench" / "_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AVX512 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512_vnni avx512_bf16

processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f
"""
AVX2 = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx_vnni
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_cpuinfo_gives_the_model_and_the_highest_x86_level(report):
    cpu = report.cpu_from_cpuinfo(AVX512)
    assert cpu == {"cpu": "AMD EPYC 9R14 96-Core Processor", "isa": "AVX-512",
                   "isa_extensions": ["fma", "f16c", "avx512_vnni", "avx512_bf16"]}, cpu
    cpu = report.cpu_from_cpuinfo(AVX2)
    assert cpu["isa"] == "AVX2" and cpu["isa_extensions"] == ["fma", "f16c", "avx_vnni"], cpu


def test_cpuinfo_of_an_arm_cpu(report):
    cpu = report.cpu_from_cpuinfo(ARM)
    assert cpu["isa"] == "SVE", cpu
    assert cpu["cpu"] == "Arm CPU (implementer 0x41, part 0xd40)", cpu
    assert cpu["isa_extensions"] == ["asimd", "asimdhp", "i8mm", "bf16", "sve"], cpu


def test_cpuinfo_without_flags_says_nothing_it_does_not_know(report):
    assert report.cpu_from_cpuinfo("") == {"cpu": None, "isa": None, "isa_extensions": []}


def test_a_run_records_machine_versions_commit_and_load(report):
    meta = report.start_run("benchmarks.md", ("speed",), versions=("onnxruntime", "no-such-package"), threads=2)
    assert meta["docs"] == [{"page": "benchmarks.md", "sections": ["speed"]}]
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["arch"], meta["machine"]
    assert "onnxruntime" in meta["versions"] and "no-such-package" not in meta["versions"], meta["versions"]
    assert meta["threads"] == 2
    assert set(meta["load_average"]) == {"start"}
    if Path("/proc/cpuinfo").exists():
        assert meta["machine"]["cpu"] and meta["machine"]["isa"], meta["machine"]


def test_results_file_round_trip(report, tmp_path):
    meta = report.start_run("benchmarks.md")
    path = tmp_path / "sub" / "x.json"
    written = report.write_results(path, meta, [{"model": "m", "ms": 1.5}], threads=2)
    assert "end" in written["meta"]["load_average"] and written["meta"]["finished"]
    data = report.read_results(path)
    assert data == json.loads(json.dumps(written)) and data["threads"] == 2
    assert not list(path.parent.glob(".*.tmp")), "the staging file stayed behind"


def test_results_unfinished_run_has_no_end_yet(report, tmp_path):
    meta = report.start_run("benchmarks.md")
    data = report.write_results(tmp_path / "x.json", meta, [], final=False)
    assert "finished" not in data["meta"] and "end" not in data["meta"]["load_average"]


def test_rows_must_be_a_list(report, tmp_path):
    with pytest.raises(TypeError, match="rows must be a list"):
        report.write_results(tmp_path / "x.json", {}, {"defaults": {}})


def test_reading_a_missing_or_foreign_file_names_it(report, tmp_path):
    with pytest.raises(SystemExit, match="no such results file"):
        report.read_results(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"defaults": 1}))
    with pytest.raises(SystemExit, match="not a results file"):
        report.read_results(tmp_path / "other.json")


def test_machine_line_of_a_recorded_run(report):
    meta = {"machine": {"cpu": "AMD EPYC", "isa": "AVX2", "isa_extensions": ["fma", "avx_vnni"], "cores": 2,
                        "arch": "x86_64"},
            "versions": {"python": "3.11.7", "onnxruntime": "1.32.0", "torch": "2.14.1"}, "commit": "abc1234",
            "dirty": True, "date": "2026-12-08", "load_average": {"start": 0.5, "end": 3.25}}
    assert report.machine_line(meta) == (
        "Ran on: AMD EPYC (AVX2: avx_vnni), 2 cores, x86_64; onnxruntime 1.32.0, torch 2.14.1; gradmap abc1234 "
        "with uncommitted changes; 2026-12-08; 1-minute load average 0.5 at the start, 3.25 at the end.")


def test_machine_line_of_an_older_results_file_says_what_is_not_recorded(report):
    assert report.machine_line({"machine": "x86_64, cpu", "onnxruntime": "1.32.0"}) == (
        'Ran on: CPU not recorded (the results file says "x86_64, cpu"); onnxruntime 1.32.0; date not recorded; '
        "load average not recorded.")
    assert report.machine_line({}) == "Ran on: CPU not recorded; date not recorded; load average not recorded."


def test_an_update_keeps_the_earlier_runs_machines(report):
    earlier = {"machine": "x86_64, cpu", "date": "2026-12-03"}
    now = {"machine": {"cpu": "AMD EPYC", "isa": "AVX-512", "cores": 2, "arch": "x86_64"}, "date": "2026-12-08"}
    once = report.merge_update(now, earlier, ["resnet50"])
    twice = report.merge_update({**now, "date": "2026-12-09"}, once, ["vgg19"])
    assert [m["date"] for m in twice["earlier_runs"]] == ["2026-12-08", "2026-12-03"]
    line = report.machine_line(twice)
    assert "This run re-measured vgg19; the other rows are from earlier runs: AMD EPYC (AVX-512), 2 cores, " \
           "x86_64, 2026-12-08; CPU not recorded" in line, line


def test_sections_are_replaced_between_their_markers_only(report):
    text = "a\n<!-- BEGIN t -->\nold\n<!-- END t -->\nb\n<!-- BEGIN u -->\nkeep\n<!-- END u -->\n"
    new = report.replace_section(text, "t", "new\nlines\n")
    assert new == "a\n<!-- BEGIN t -->\nnew\nlines\n<!-- END t -->\nb\n<!-- BEGIN u -->\nkeep\n<!-- END u -->\n"
    assert report.replace_section(new, "t", "new\nlines") == new
    assert report.section_body(new, "u") == "keep\n"
    with pytest.raises(SystemExit, match="docs/x.md has no generated section 'v'"):
        report.replace_section(text, "v", "x", where="docs/x.md")


def test_table_lines(report):
    assert report.table(["a", "b"], [[1, "x"], [2.5, ""]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 |  |"]


def test_shared_flags_and_their_old_names(report, tmp_path):
    parser = argparse.ArgumentParser()
    report.add_flags(parser, tmp_path / "r.json", note=True)
    args = parser.parse_args(["--readme-only", "--no-readme"])
    assert args.tables_only and args.no_docs and args.out == tmp_path / "r.json" and args.note == ""
    args = parser.parse_args(["--tables-only", "--out", "x.json"])
    assert args.tables_only and not args.no_docs and args.out == Path("x.json")
    prose = argparse.ArgumentParser()
    report.add_flags(prose, tmp_path / "r.json", tables=False)
    with pytest.raises(SystemExit):
        prose.parse_args(["--tables-only"])


def test_run_index_lists_every_results_file(report):
    index = report.runs_section()
    for path in report.result_files():
        assert f"`{path.relative_to(ROOT)}`" in index, path
    rows = [line for line in index.splitlines() if line.startswith("| `")]
    assert len(rows) == len(report.result_files())


def test_every_results_file_is_meta_and_rows(report):
    for path in sorted(report.RESULTS.glob("*.json")):
        data = report.read_results(path)
        assert data["meta"].get("script") and data["meta"].get("docs"), f"{path.name}: no script or docs in meta"
        assert (ROOT / data["meta"]["script"]).is_file(), f"{path.name}: {data['meta']['script']} does not exist"


def test_the_module_needs_only_the_standard_library(report):
    """bench_foreign's worker imports it in a venv without numpy or gradmap."""
    import ast

    tree = ast.parse((ROOT / "bench" / "_report.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    foreign = {name for name in imported if name not in sys.stdlib_module_names and name != "__future__"}
    assert not foreign, f"bench/_report.py imports {foreign}"


def test_tables_only_renders_the_recorded_results_and_measures_nothing(report, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    report.add_flags(parser, tmp_path / "r.json")
    report.write_results(tmp_path / "r.json", {"script": "x"}, [{"model": "a", "ms": 1.0}])
    published = []
    monkeypatch.setattr(report, "publish", lambda page, sections: published.append((page, sections)))

    def measure():
        raise AssertionError("--tables-only measured")

    data = report.render_or_measure(report.parse_args(parser, ["--tables-only"]), "p.md",
                                    lambda d: {"t": str(d["rows"])}, measure)
    assert data["rows"] == [{"model": "a", "ms": 1.0}]
    assert published == [("p.md", {"t": "[{'model': 'a', 'ms': 1.0}]"})]
    report.render_or_measure(report.parse_args(parser, ["--tables-only", "--no-docs"]), "p.md", dict, measure)
    assert len(published) == 1, "--no-docs published"


def test_a_scripts_readme_sections_are_published_with_its_tables(report, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    report.add_flags(parser, tmp_path / "r.json")
    report.write_results(tmp_path / "r.json", {"script": "x"}, [{"model": "a"}])
    published = []
    monkeypatch.setattr(report, "publish", lambda page, sections, readme: published.append((page, sections, readme)))
    report.render_or_measure(report.parse_args(parser, ["--tables-only"]), "p.md", lambda d: {"t": "table"},
                             lambda: None, lambda d: {"s": f"{len(d['rows'])} row"})
    assert published == [("p.md", {"t": "table"}, {"s": "1 row"})]


def test_a_measuring_run_returns_what_measure_wrote(report, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    report.add_flags(parser, tmp_path / "r.json")
    args = report.parse_args(parser, ["--no-docs"])
    monkeypatch.setattr(report, "publish", lambda page, sections: pytest.fail("--no-docs published"))
    data = report.render_or_measure(args, "p.md", dict,
                                    lambda: report.write_results(args.out, {"script": "x"}, [{"model": "b"}]))
    assert data == report.read_results(tmp_path / "r.json") and data["rows"] == [{"model": "b"}]


def test_update_replaces_the_remeasured_models_rows_only(report, tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+")
    report.add_flags(parser, tmp_path / "r.json", update=True)
    with pytest.raises(SystemExit):
        report.parse_args(parser, ["--update", "--models", "b"])  # without a --note
    saved = [{"model": "a", "batch": 1}, {"model": "b", "batch": 1}, {"model": "b", "batch": 8}, {"model": "c"}]
    report.write_results(tmp_path / "r.json", {"date": "2026-12-01"}, saved)
    args = report.parse_args(parser, ["--update", "--models", "b", "d", "--note", "b and d again"])
    rows, meta = report.updated(args, {"date": "2026-12-08"}, [{"model": "b", "batch": 8, "new": True},
                                                               {"model": "d"}])
    assert rows == [{"model": "a", "batch": 1}, {"model": "b", "batch": 8, "new": True}, {"model": "c"},
                    {"model": "d"}]
    assert meta["remeasured"] == ["b", "d"] and meta["earlier_runs"][0]["date"] == "2026-12-01"
    plain = report.parse_args(parser, ["--models", "b"])
    assert report.updated(plain, {"date": "x"}, [{"model": "b"}]) == ([{"model": "b"}], {"date": "x"})
