"""The registry of vector-Jacobian rules: one function per ONNX op type.

A rule receives the forward node and the gradients of its outputs (``None`` where an output
carries none) and returns the gradients of its inputs (``None`` where an input needs none). It
emits nodes through ``ctx`` only, so a rule reads like its formula. Ops that carry no gradient
(shape arithmetic, comparisons, index computations) are listed in :data:`NON_DIFFERENTIABLE`;
an op in neither table stops the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import onnx_ir as ir

if TYPE_CHECKING:
    from ._context import GradContext

__all__ = ["Rule", "RULES", "COMPOSITES", "NON_DIFFERENTIABLE", "RuleTable", "register", "register_composite",
           "is_supported"]

Grads = Sequence["ir.Value | None"]
Rule = Callable[["GradContext", ir.Node, Grads], Sequence["ir.Value | None"]]

RULES: dict[str, Rule] = {}

#: Composite rules: a function written as several forward nodes whose vector-Jacobian product is
#: shorter as a whole (SiLU = X * Sigmoid(X)). Keyed by the op type of the pattern's last node:
#: (name, match, rule) with ``match(node) -> parts | None`` and ``rule(ctx, node, grads, parts)``.
#: The pattern's inner nodes then receive no gradient and are skipped.
COMPOSITES: dict[str, list[tuple[str, Callable, Callable]]] = {}

#: Ops whose outputs are piecewise constant in their inputs or are not real-valued: no gradient
#: flows through them, and a value computed by one of them never depends on ``image`` for
#: differentiation purposes.
NON_DIFFERENTIABLE: frozenset[str] = frozenset(
    {
        "ArgMax", "ArgMin", "Shape", "Size", "ConstantOfShape", "Constant", "Range", "EyeLike",
        "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
        "IsNaN", "IsInf", "Sign", "Floor", "Ceil", "Round", "NonZero", "OneHot",
        "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
        "BitShift",
    }
)


def register(*op_types: str) -> Callable[[Rule], Rule]:
    """Decorator: register ``fn`` as the gradient rule of ``op_types``."""

    def decorate(fn: Rule) -> Rule:
        for op_type in op_types:
            if op_type in RULES:
                raise ValueError(f"duplicate gradient rule for {op_type}")
            RULES[op_type] = fn
        return fn

    return decorate


def register_composite(name: str, root: str, match: Callable) -> Callable:
    """Decorator: register ``fn`` as the rule of the composite ``name`` whose last node is a
    ``root`` op and that ``match`` recognizes."""

    def decorate(fn):
        COMPOSITES.setdefault(root, []).append((name, match, fn))
        return fn

    return decorate


def is_supported(op_type: str) -> bool:
    return op_type in RULES or op_type in NON_DIFFERENTIABLE


@dataclass(frozen=True)
class RuleTable:
    """The rules one gradient pass uses: gradmap's own (:meth:`default`, the registered ones) or those
    with some replaced (:meth:`replaced`), as ``bench/floor.py`` builds its floor graph."""

    rules: Mapping[str, Rule] = field(default_factory=lambda: RULES)
    composites: Mapping[str, Sequence[tuple[str, Callable, Callable]]] = field(default_factory=lambda: COMPOSITES)

    @classmethod
    def default(cls) -> "RuleTable":
        return cls(RULES, COMPOSITES)

    def replaced(self, rules: Mapping[str, Rule] | None = None, composite_rule: Callable | None = None) -> "RuleTable":
        """A copy with ``rules`` (op type: rule; each op type must have a rule already) in place of
        the registered ones and, if given, ``composite_rule`` as the rule of every composite."""
        rules = dict(rules or {})
        unknown = sorted(set(rules) - set(self.rules))
        if unknown:
            raise ValueError(f"no registered gradient rule to replace for {', '.join(unknown)}")
        composites = {root: [(name, match, composite_rule or rule) for name, match, rule in entries]
                      for root, entries in self.composites.items()}
        return RuleTable({**self.rules, **rules}, composites)
