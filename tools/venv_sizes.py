"""Measure the installed size of the slim runtime venv against the export venv.

    python tools/venv_sizes.py

Creates two fresh venvs in a temporary folder with this interpreter (``pip install .`` and
``pip install '.[export]'``), measures them with ``du``, writes docs/venv_sizes.json and the
README section. Takes a few minutes (the export venv holds PyTorch).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from update_readme import README, replace_section  # noqa: E402


def venv_size(extra: str, where: Path) -> tuple[int, list[str]]:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    pip = where / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(pip), "install", "-q", f"{ROOT}{extra}"], check=True)
    size = int(subprocess.run(["du", "-sk", str(where)], capture_output=True, text=True, check=True).stdout.split()[0])
    frozen = subprocess.run([str(pip), "freeze"], capture_output=True, text=True, check=True).stdout.split()
    return size * 1024, frozen


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gradmap-venvs-") as tmp:
        slim, slim_pkgs = venv_size("", Path(tmp) / "slim")
        full, full_pkgs = venv_size("[export]", Path(tmp) / "export")
    has_torch = any(p.lower().startswith("torch==") for p in slim_pkgs)
    result = {"runtime_bytes": slim, "export_bytes": full, "runtime_packages": slim_pkgs,
              "runtime_has_torch": has_torch, "export_packages": len(full_pkgs)}
    (ROOT / "docs" / "venv_sizes.json").write_text(json.dumps(result, indent=1) + "\n")
    mb = 1024 * 1024
    body = (f"Installed size, fresh venvs (`python tools/venv_sizes.py`): runtime `pip install .` "
            f"**{slim / mb:.0f} MB** ({len(slim_pkgs)} packages, torch {'present' if has_torch else 'absent'}); "
            f"export `pip install '.[export]'` **{full / mb:.0f} MB**, {full / slim:.0f}x as much.")
    README.write_text(replace_section(README.read_text(), "sizes", body))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
