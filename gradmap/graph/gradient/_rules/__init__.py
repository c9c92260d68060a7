"""Gradient rules, one module per op family. Importing this package registers them all."""

from . import activations, composites, convolution, elementwise, linear, normalization, pooling, shape  # noqa: F401
