"""MkDocs hooks (mkdocs.yml ``hooks:``): the site's home page is README.md itself.

README links into docs/ as a repository page must (``docs/running.md``, ``docs/figures/x.png``);
inside the site those pages sit at the root, so the home page's links lose their ``docs/`` prefix.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def home_page(readme: str) -> str:
    """README's text with its links into docs/ made relative to the site's root."""
    return re.sub(r"\]\(docs/", "](", readme)


def on_files(files, config):
    from mkdocs.structure.files import File

    if files.get_file_from_path("index.md") is None:
        files.append(File.generated(config, "index.md", content=home_page((ROOT / "README.md").read_text())))
    return files
