"""Regenerate the method table in docs/methods.md from gradmap.contract.METHOD_TABLE.

    python tools/method_table.py           # rewrite the section
    python tools/method_table.py --check   # exit 1 when docs/methods.md is out of date

The section lives between ``<!-- BEGIN method-table -->`` and ``<!-- END method-table -->``;
tests/test_method_table.py checks that it is current.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import _report  # noqa: E402  (puts the checkout first on sys.path too)

from gradmap import contract  # noqa: E402

PAGE = "methods.md"
SECTION = "method-table"


def _setting(setting: contract.Setting) -> str:
    if setting.type == "choice":
        kind = ", ".join(setting.choices[:-1]) + f" or {setting.choices[-1]}"
    else:
        bounds = [f">= {setting.minimum:g}" if setting.minimum is not None else "",
                  f"<= {setting.maximum:g}" if setting.maximum is not None else ""]
        kind = " ".join([setting.type, *(b for b in bounds if b)])
    return f"`{setting.name}`: {kind}, default {setting.default}"


def method_table() -> str:
    """The section's Markdown: one row per method, then the settings every method has."""
    lines = ["| method | kind | reads | export with | web page | settings |",
             "|---|---|---|---|---|---|"]
    for m in contract.METHOD_TABLE:
        outputs = ", ".join(f"`{o}`" for o in m.outputs)
        export = " ".join(f"`{o}`" for o in m.export_options) or "(any export)"
        settings = "<br>".join(_setting(s) for s in m.settings) or "-"
        lines.append(f"| `{m.name}` | {m.kind} | {outputs} | {export} | {'yes' if m.web else 'no'} | {settings} |")
    lines += ["", "Every method also has: " + "; ".join(_setting(s) for s in contract.COMMON_SETTINGS) + ".",
              f"The default method is `{contract.DEFAULT_METHOD}`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the section is current")
    args = parser.parse_args()
    if args.check:
        if _report.check_sections(PAGE, {SECTION: method_table()}):
            print(f"docs/{PAGE} is out of date: python tools/method_table.py", file=sys.stderr)
            return 1
        return 0
    _report.write_sections(PAGE, {SECTION: method_table()})
    print(f"wrote the method table of docs/{PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
