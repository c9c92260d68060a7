"""Matrix products.

    MatMul:  dA = sum_to(dY @ B^T, A),  dB = sum_to(A^T @ dY, B)       (batched, broadcast)
    Gemm:    Y = alpha A' B' + beta C:  dA' = alpha dY B'^T,  dB' = alpha A'^T dY,  dC = beta sum_to(dY, C)
    Einsum:  d operand_i = Einsum(out, other -> operand_i)                (two operands, or one without reduction)
"""

from __future__ import annotations

from ...errors import ExportError
from .._registry import register


def _swap_last(ctx, x, rank):
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.op("Transpose", x, perm=perm)


@register("MatMul")
def matmul(ctx, node, dy):
    a, b = node.inputs
    y = node.outputs[0]
    ra, rb = ctx.rank(a), ctx.rank(b)
    if ra < 2 or rb < 2:
        raise ExportError(f"{node.name}: MatMul with a 1-D operand has no gradient rule yet")
    ydims = ctx.dims(y)
    batch = ydims[:-2]
    da = db = None
    if ctx.needs_grad(a):
        g = ctx.op("MatMul", dy[0], _swap_last(ctx, b, rb))
        da = ctx.sum_to(g, batch + ctx.dims(a)[-2:], a)
    if ctx.needs_grad(b):
        g = ctx.op("MatMul", _swap_last(ctx, a, ra), dy[0])
        db = ctx.sum_to(g, batch + ctx.dims(b)[-2:], b)
    return [da, db]


@register("Gemm")
def gemm(ctx, node, dy):
    a, b = node.inputs[:2]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    alpha = ctx.attr(node, "alpha", 1.0)
    beta = ctx.attr(node, "beta", 1.0)
    trans_a = ctx.attr(node, "transA", 0)
    trans_b = ctx.attr(node, "transB", 0)
    g = dy[0]
    da = db = dc = None
    if ctx.needs_grad(a):
        if trans_a:
            da = ctx.op("Gemm", b, g, alpha=alpha, transA=trans_b, transB=1)
        else:
            da = ctx.op("Gemm", g, b, alpha=alpha, transB=1 - trans_b)
    if ctx.needs_grad(b):
        if trans_b:
            db = ctx.op("Gemm", g, a, alpha=alpha, transA=1, transB=trans_a)
        else:
            db = ctx.op("Gemm", a, g, alpha=alpha, transA=1 - trans_a)
    if c is not None and ctx.needs_grad(c):
        dc = ctx.sum_to(g, node.outputs[0], c)
        if beta != 1.0:
            dc = ctx.op("Mul", dc, ctx.scalar(beta))
    return [da, db, dc]


@register("Einsum")
def einsum(ctx, node, dy):
    equation = ctx.attr(node, "equation").replace(" ", "")
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    grads = []
    for i, (x, term) in enumerate(zip(node.inputs, terms)):
        if not ctx.needs_grad(x):
            grads.append(None)
            continue
        others = [(v, t) for j, (v, t) in enumerate(zip(node.inputs, terms)) if j != i]
        available = set(out).union(*(set(t) for _, t in others))
        if len(set(term.replace("...", ""))) != len(term.replace("...", "")) or not set(term) <= available:
            raise ExportError(f"{node.name}: Einsum {equation!r} has no gradient rule for operand {i}")
        grad_eq = ",".join([out] + [t for _, t in others]) + "->" + term
        grads.append(ctx.op("Einsum", dy[0], *[v for v, _ in others], equation=grad_eq))
    return grads
