"""Composites: which rule applies to which layer, by layer type and position, plus named presets.

Selectors (checked in order, the first match wins): ``"first"`` / ``"last"`` (the first / last conv or
linear layer in execution order), an ``int`` (index among the conv/linear layers), ``"conv"``, ``"linear"``,
``"*"`` (any).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from scripts.lrp.layers import LinearOp
from scripts.lrp.rules import AlphaBeta, Epsilon, Flat, Rule, WSquare, ZBox, ZPlus

__all__ = ["Composite", "PRESETS", "get_composite", "preset_name"]


class Composite:
    """An ordered list of ``(selector, rule)`` pairs."""

    def __init__(self, rules: Sequence[tuple[str | int, Rule]], name: str = "custom"):
        self.rules = list(rules)
        self.name = name
        for selector, rule in self.rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"composite {name}: {rule!r} for selector {selector!r} is not a Rule")
            if not (isinstance(selector, int) or selector in ("first", "last", "conv", "linear", "*")):
                raise ValueError(f"composite {name}: unknown selector {selector!r}")

    def rule_for(self, index: int, count: int, op: LinearOp) -> Rule:
        for selector, rule in self.rules:
            if (
                selector == "*"
                or (selector == "first" and index == 0)
                or (selector == "last" and index == count - 1)
                or (isinstance(selector, int) and selector in (index, index - count))
                or (selector == "conv" and op.is_conv)
                or (selector == "linear" and not op.is_conv)
            ):
                return rule
        raise ValueError(f"composite {self.name}: no rule for layer {op.name} ({type(op.module).__name__})")

    def __repr__(self) -> str:
        return f"Composite({self.name!r}, {self.rules!r})"


def _alpha_beta(alpha: float, beta: float, name: str) -> Composite:
    return Composite([("*", AlphaBeta(alpha, beta))], name)


PRESETS = {
    # the seed's setting: one alpha-beta rule on every layer
    "a1b0": lambda: _alpha_beta(1, 0, "a1b0"),
    "a2b1": lambda: _alpha_beta(2, 1, "a2b1"),
    "a3b2": lambda: _alpha_beta(3, 2, "a3b2"),
    "zplus": lambda: Composite([("*", ZPlus())], "zplus"),
    "epsilon": lambda: Composite([("*", Epsilon(1e-6))], "epsilon"),
    # zennit's EpsilonAlpha2Beta1: alpha2beta1 on convolutions, epsilon on fully connected layers
    "epsilon_a2b1": lambda: Composite([("conv", AlphaBeta(2, 1)), ("linear", Epsilon(1e-6))], "epsilon_a2b1"),
    # first-layer variants for standardised input (z^B with each sample's bounds, w^2, flat)
    "zbox_a2b1": lambda: Composite(
        [("first", ZBox("auto", "auto")), ("conv", AlphaBeta(2, 1)), ("linear", Epsilon(1e-6))], "zbox_a2b1"),
    "wsquare_a2b1": lambda: Composite(
        [("first", WSquare()), ("conv", AlphaBeta(2, 1)), ("linear", Epsilon(1e-6))], "wsquare_a2b1"),
    "flat_a2b1": lambda: Composite(
        [("first", Flat()), ("conv", AlphaBeta(2, 1)), ("linear", Epsilon(1e-6))], "flat_a2b1"),
}

_AB = re.compile(r"^a(\d+(?:\.\d+)?)b(\d+(?:\.\d+)?)$")


def preset_name(alpha: float, beta: float) -> str:
    """File-name friendly name of the alpha-beta preset: (2, 1) -> ``a2b1``."""
    return f"a{alpha:g}b{beta:g}"


def get_composite(spec) -> Composite:
    """A Composite from a preset name (any ``a<alpha>b<beta>`` works), an ``(alpha, beta)`` pair, or a Composite."""
    if isinstance(spec, Composite):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return _alpha_beta(float(spec[0]), float(spec[1]), preset_name(*spec))
    if isinstance(spec, str):
        if spec in PRESETS:
            return PRESETS[spec]()
        match = _AB.match(spec)
        if match:
            return _alpha_beta(float(match.group(1)), float(match.group(2)), spec)
    raise ValueError(f"unknown LRP composite {spec!r}; presets: {sorted(PRESETS)} or 'a<alpha>b<beta>'")
