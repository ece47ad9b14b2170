"""Layer-wise relevance propagation for chains of Conv/BatchNorm/ReLU/pooling/Linear modules -- pure torch.

Small modules: ``rules`` (alpha-beta, epsilon, z+, z^B, w^2, flat), ``layers`` (conv/linear operators and
BatchNorm folding that never changes the model), ``composites`` (which rule for which layer, presets) and
``propagation`` (the traced forward pass and the backward walk).
"""

from scripts.lrp.composites import PRESETS, Composite, get_composite, preset_name
from scripts.lrp.propagation import LRP, Explanation, Trace, UnsupportedModuleError
from scripts.lrp.rules import AlphaBeta, Epsilon, Flat, Rule, WSquare, ZBox, ZPlus, stabilize

__all__ = [
    "LRP", "PRESETS", "AlphaBeta", "Composite", "Epsilon", "Explanation", "Flat", "Rule", "Trace",
    "UnsupportedModuleError", "WSquare", "ZBox", "ZPlus", "get_composite", "preset_name", "stabilize",
]
