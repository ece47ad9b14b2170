"""Composites: which rule applies to which layer, by layer type and position, plus named presets.

Selectors (checked in order, the first match wins): ``"first"`` / ``"last"`` (the first / last conv or
linear layer in execution order), an ``int`` (index among the conv/linear layers), ``"conv"``, ``"linear"``,
``"*"`` (any).

Preset names (:func:`get_composite`):

- ``a<alpha>b<beta>`` (any alpha - beta = 1, e.g. ``a1b0``, ``a2b1``, ``a3b2``): one alpha-beta rule everywhere;
  ``zplus`` (= ``a1b0``), ``epsilon``.
- zennit's named composites (same rules and parameters as zennit 0.5.1's ``zennit.composites`` classes):
  ``epsilon_a2b1`` (EpsilonAlpha2Beta1), ``flat_a2b1`` (EpsilonAlpha2Beta1Flat), ``epsilon_plus``
  (EpsilonPlus: z+ on convolutions, epsilon 1e-6 on dense layers), ``epsilon_plus_flat`` (EpsilonPlusFlat: flat
  on the first layer, then as epsilon_plus), ``epsilon_gamma_box`` (EpsilonGammaBox: z^B on the first layer with
  ``low``/``high`` = each input volume's own minimum/maximum, gamma 0.25 on the other convolutions, epsilon 1e-6 on
  dense layers; all stabilisers 1e-6).
- other first-layer variants for standardised input: ``zbox_a2b1``, ``wsquare_a2b1``.
- ``<preset>_nobias`` (e.g. ``a2b1_nobias``, ``epsilon_gamma_box_nobias``): the same composite with every rule
  bias-free (``zero_bias=True``; zennit: the composite built with ``zero_params='bias'``).

"first" is the first conv/linear layer; zennit's EpsilonGammaBox takes the first *convolution*, which is the same
layer for every network that starts with one (this bundle's CNN does).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from scripts.lrp.layers import LinearOp
from scripts.lrp.rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus

__all__ = ["NOBIAS_SUFFIX", "PRESETS", "Composite", "get_composite", "preset_name"]

NOBIAS_SUFFIX = "_nobias"


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

    def without_bias(self) -> Composite:
        """The same composite with every rule bias-free (:meth:`Rule.without_bias`), named ``<name>_nobias``."""
        rules = [(selector, rule.without_bias()) for selector, rule in self.rules]
        return Composite(rules, self.name + NOBIAS_SUFFIX)

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
    # zennit's EpsilonPlus, EpsilonPlusFlat, EpsilonGammaBox (its defaults: epsilon 1e-6, gamma 0.25, stabiliser 1e-6)
    "epsilon_plus": lambda: Composite([("conv", ZPlus()), ("linear", Epsilon(1e-6))], "epsilon_plus"),
    "epsilon_plus_flat": lambda: Composite(
        [("first", Flat()), ("conv", ZPlus()), ("linear", Epsilon(1e-6))], "epsilon_plus_flat"),
    "epsilon_gamma_box": lambda: Composite(
        [("first", ZBox("auto", "auto")), ("conv", Gamma(0.25)), ("linear", Epsilon(1e-6))], "epsilon_gamma_box"),
}

_AB = re.compile(r"^a(\d+(?:\.\d+)?)b(\d+(?:\.\d+)?)$")


def preset_name(alpha: float, beta: float) -> str:
    """File-name friendly name of the alpha-beta preset: (2, 1) -> ``a2b1``."""
    return f"a{alpha:g}b{beta:g}"


def get_composite(spec) -> Composite:
    """A Composite from a preset name (any ``a<alpha>b<beta>`` works; ``<name>_nobias`` for the bias-free variant),
    an ``(alpha, beta)`` pair, or a Composite."""
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
        if spec.endswith(NOBIAS_SUFFIX) and len(spec) > len(NOBIAS_SUFFIX):
            base = spec[: -len(NOBIAS_SUFFIX)]
            if base in PRESETS or _AB.match(base):
                return get_composite(base).without_bias()
    raise ValueError(f"unknown LRP composite {spec!r}; presets: {sorted(PRESETS)}, 'a<alpha>b<beta>', "
                     f"each also as '<preset>{NOBIAS_SUFFIX}'")
