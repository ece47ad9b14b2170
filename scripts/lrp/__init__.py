"""Layer-wise relevance propagation for chains of Conv/BatchNorm/ReLU/pooling/Linear modules -- pure torch.

Small modules: ``rules`` (alpha-beta, gamma, epsilon, z+, z^B, w^2, flat; each optionally bias-free), ``layers``
(conv/linear operators and BatchNorm folding that never changes the model), ``composites`` (which rule for which
layer, presets -- see its docstring for the preset names) and ``propagation`` (the traced forward pass and the
backward walk).
"""

from scripts.lrp.composites import NOBIAS_SUFFIX, PRESETS, Composite, get_composite, preset_name
from scripts.lrp.propagation import LRP, Explanation, Trace, UnsupportedModuleError
from scripts.lrp.rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus, stabilize

__all__ = [
    "LRP", "NOBIAS_SUFFIX", "PRESETS", "AlphaBeta", "Composite", "Epsilon", "Explanation", "Flat", "Gamma", "Rule",
    "Trace", "UnsupportedModuleError", "WSquare", "ZBox", "ZPlus", "get_composite", "preset_name", "stabilize",
]
