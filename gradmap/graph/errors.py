"""Errors of the graph code and of every export source: each message names the input and the reason."""

from __future__ import annotations

__all__ = ["ExportError", "UnsupportedOpsError", "ParityError"]


class ExportError(Exception):
    """An export that cannot proceed; the message says which input and why."""


class UnsupportedOpsError(ExportError):
    """The forward graph holds ops without a gradient rule."""

    def __init__(self, missing: dict[str, list[str]]):
        self.missing = missing
        lines = [f"  {op}: {', '.join(nodes[:5])}{' …' if len(nodes) > 5 else ''} ({len(nodes)} nodes)"
                 for op, nodes in sorted(missing.items())]
        super().__init__(
            f"no gradient rule for {len(missing)} op type(s) in the exported graph:\n" + "\n".join(lines)
        )


class ParityError(ExportError):
    """The exported model disagrees with its float64 reference beyond tolerance; nothing was written."""
