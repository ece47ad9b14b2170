"""LRP rules for linear layers (conv / fully connected), written as explicit forward/transpose computations.

Every rule follows zennit 0.5.1's definitions (``zennit.rules``) exactly -- same stabiliser, same handling of
biases and of negative inputs -- so its maps can be checked against zennit (``tests/test_lrp.py``). Notation for
one layer ``z_j = sum_i x_i w_ij + b_j``: ``x+ = max(x, 0)``, ``x- = min(x, 0)``, likewise ``w+-``, ``b+-``; ``R_j``
is the relevance of output j, ``R_i`` the relevance given to input i.

- stabiliser: ``z + eps * sign(z)`` with ``sign(0) = +1`` (:func:`stabilize`).
- :class:`AlphaBeta` (alpha - beta = 1, beta >= 0): positive part ``x+ w+ + b+ + x- w-``, negative part
  ``x+ w- + b- + x- w+``; the ``x-`` terms are skipped when the input is non-negative (they are exactly 0).
- :class:`Gamma` (LRP-gamma): weights ``w + gamma w+`` for outputs with ``z_j > 0`` (and ``w + gamma w-`` for
  ``z_j < 0``), biases treated the same way.
- :class:`Epsilon`, :class:`ZPlus` (= alpha1beta0), and first-layer rules :class:`ZBox` (z^B with low/high),
  :class:`WSquare`, :class:`Flat`.

Bias-free rules: every rule takes ``zero_bias=True`` (zennit's ``zero_params=['bias']``), which leaves the layer's
bias -- a folded BatchNorm's shift included -- out of the rule, so that biases neither absorb nor add relevance;
:meth:`Rule.without_bias` returns such a copy of a rule. :class:`ZBox` is unchanged by it (its biases cancel) and
:class:`Flat` never uses biases (as in zennit). Only the gamma rule's choice between its two cases still looks at
the layer's real output ``z_j`` (bias included), as zennit's does.

A rule's ``stats(op, x)`` holds the layer quantities that do not depend on the relevance (denominators); the
engine caches them so that several presets sharing a rule kind, and several targets, reuse them.
"""

from __future__ import annotations

import copy

import torch

from scripts.lrp.layers import LinearOp

__all__ = ["AlphaBeta", "Epsilon", "Flat", "Gamma", "Rule", "WSquare", "ZBox", "ZPlus", "stabilize"]


ONCE_BLOCK_ELEMENTS = 1 << 24  # at most 64 MiB of float32 per block of output channels in AlphaBeta.backward_once;
# smaller blocks lower the peak memory of a single map further but cost one more (slow) transposed conv each


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """zennit's stabiliser: add ``eps`` with the sign of ``z`` (``+eps`` where ``z == 0``)."""
    return torch.where(z >= 0, z + eps, z - eps)


RECIPROCAL_CHUNK_ELEMENTS = 1 << 22  # temporaries of stabilized_reciprocal_: at most this many elements


def stabilized_reciprocal_(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / stabilize(z, eps)`` computed in place as ``1 / copysign(|z| + eps, z)`` (``z + 0.0`` first turns -0.0
    into +0.0, which gets +eps as in zennit), in blocks of channels of about ``RECIPROCAL_CHUNK_ELEMENTS`` elements
    to keep temporaries small."""
    per_channel = max(1, z.numel() // max(1, z.shape[1])) if z.ndim > 1 else z.numel()
    step = max(1, RECIPROCAL_CHUNK_ELEMENTS // per_channel)
    for part in z.split(step, 1) if z.ndim > 1 else (z,):
        part.add_(0.0)
        torch.copysign(part.abs().add_(eps), part, out=part)
    return z.reciprocal_()


def _channel_view(bias: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against a (batch, channel, *spatial) tensor of ``ndim`` dims."""
    return bias.reshape((1, -1) + (1,) * (ndim - 2))


def _interleave(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """Channels ``[a, b]`` per convolution group (``[a, b]`` for ``groups == 1``), to be read by weights whose input
    channels are ``torch.cat([wa, wb], 1)``."""
    n, c = a.shape[:2]
    rest = tuple(a.shape[2:])
    return torch.stack([a.reshape((n, groups, c // groups) + rest), b.reshape((n, groups, c // groups) + rest)],
                       2).reshape((n, 2 * c) + rest)


def _deinterleave(g: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_interleave`."""
    n, c2 = g.shape[:2]
    rest = tuple(g.shape[2:])
    g = g.reshape((n, groups, 2, c2 // (2 * groups)) + rest)
    return g[:, :, 0].reshape((n, c2 // 2) + rest), g[:, :, 1].reshape((n, c2 // 2) + rest)


class Rule:
    """Base class: ``backward(op, x, relevance, stats) -> input relevance``. ``zero_bias=True``: the rule leaves the
    layer's bias out (zennit's ``zero_params=['bias']``)."""

    kind: str = "rule"  # rules with the same kind share cached stats
    zero_bias: bool = False
    proportional: bool = False  # R_i is x_i times something: no relevance for inputs that are 0 (e.g. after a ReLU)

    def __init__(self, zero_bias: bool = False):
        self.zero_bias = bool(zero_bias)

    def bias(self, op: LinearOp) -> torch.Tensor | None:
        """The bias the rule uses: the layer's, or None when ``zero_bias``."""
        return None if self.zero_bias else op.bias

    def without_bias(self) -> Rule:
        """A copy of this rule with ``zero_bias=True``."""
        rule = copy.copy(self)
        rule.zero_bias = True
        return rule

    def stats(self, op: LinearOp, x: torch.Tensor):
        return None

    def cache_key(self) -> tuple:
        """Rules with equal keys compute equal ``stats`` for the same layer input."""
        return (self.kind, self.zero_bias)

    def backward(self, op: LinearOp, x: torch.Tensor, relevance: torch.Tensor, stats,
                 reuse: bool = True) -> torch.Tensor:
        """``reuse=False``: ``stats`` will not be used again and may be overwritten (saves memory)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _TwoCaseRule(Rule):
    """Rules with two denominators per output, built from two weight sets ``u``, ``v`` (and biases ``bu``, ``bv``):
    case 1 ``x+ u + x- v + bu``, case 2 ``x+ v + x- u + bv``. Both come from one call: output channels
    ``[case 1; case 2]``; for signed input (a first layer on standardised images) the input is stacked as channels
    ``[x+, x-]`` against ``[[u, v], [v, u]]``, which also keeps single-channel 3D input on the fast convolution
    path. Subclasses give ``_params`` and turn the two denominators into the two factors applied to ``R_j``."""

    def _params(self, op: LinearOp):
        """(u, v, bu, bv)."""
        raise NotImplementedError

    def _halves(self, op: LinearOp, x: torch.Tensor):
        """(input as the rule sees it, [(weight, bias) of case 1, of case 2], signed)."""
        u, v, bu, bv = self._params(op)
        signed = bool((x < 0).any())
        if signed:
            if op.kwargs.get("groups", 1) != 1:
                raise NotImplementedError(f"LRP {type(self).__name__} on signed input: grouped convolution {op.name} "
                                          "is not supported")
            x = torch.cat([x.clamp(min=0), x.clamp(max=0)], 1)
            return x, [(torch.cat([u, v], 1), bu), (torch.cat([v, u], 1), bv)], signed
        return x, [(u, bu), (v, bv)], signed

    @staticmethod
    def _input_relevance(x, grad, signed):
        if not signed:
            return grad.mul_(x)
        g_pos, g_neg = grad.chunk(2, 1)
        return x.clamp(min=0).mul_(g_pos).add_(x.clamp(max=0).mul_(g_neg))

    @staticmethod
    def _stacked_shape(x, signed):
        return (x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:]) if signed else x.shape


class AlphaBeta(_TwoCaseRule):
    """alpha-beta rule (Bach et al. 2015, PLoS ONE 10(7): e0130140), with alpha - beta = 1, beta >= 0:

        R_i = sum_j [alpha (x_i+ w_ij+ + x_i- w_ij-) / z_j+  -  beta (x_i+ w_ij- + x_i- w_ij+) / z_j-] R_j,
        z_j+ = stab(sum_i x_i+ w_ij+ + x_i- w_ij- + b_j+),   z_j- = stab(sum_i x_i+ w_ij- + x_i- w_ij+ + b_j-)

    (zennit's ``AlphaBeta``; ``b+-`` are 0 with ``zero_bias``). The stats do not depend on alpha/beta, so every
    alpha-beta preset reuses them."""

    kind = "alphabeta"
    proportional = True

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, zero_bias: bool = False):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if abs((alpha - beta) - 1.0) > 1e-12:
            raise ValueError(f"alpha - beta must equal 1, got alpha={alpha}, beta={beta}")
        super().__init__(zero_bias)
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def cache_key(self):
        return super().cache_key() + (self.stabilizer,)

    def _params(self, op):
        bias = self.bias(op)
        return (op.weight.clamp(min=0), op.weight.clamp(max=0),
                None if bias is None else bias.clamp(min=0), None if bias is None else bias.clamp(max=0))

    def backward_once(self, op: LinearOp, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        """Same result as ``backward(op, x, R, stats(op, x))`` when the stats are not kept: the positive and the
        negative part are computed one after the other, in blocks of output channels of at most
        ``ONCE_BLOCK_ELEMENTS`` elements, in place -- the temporaries stay small whatever the layer size."""
        xin, halves, signed = self._halves(op, x)
        channels = op.weight.shape[0]
        blocks = max(1, -(-relevance.numel() // ONCE_BLOCK_ELEMENTS))
        block = -(-channels // min(blocks, channels))  # equal blocks
        grad = None
        for (weight, bias), coef in zip(halves, (self.alpha, -self.beta)):
            if coef == 0.0:
                continue
            for start in range(0, weight.shape[0], block):
                w = weight[start:start + block]
                b = None if bias is None else bias[start:start + block]
                s = stabilized_reciprocal_(op.forward(xin, w, b), self.stabilizer)
                s.mul_(relevance[:, start:start + block])
                if coef != 1.0:
                    s.mul_(coef)
                part = op.transpose(s, w, xin.shape)
                del s
                grad = part if grad is None else grad.add_(part)
                del part
        return self._input_relevance(x, grad, signed)

    def stats(self, op: LinearOp, x: torch.Tensor):
        """``inv``: reciprocal denominators, output channels ``[positive part; negative part]`` from one call -- or
        the positive part alone for beta = 0, completed by the first rule with beta > 0 that uses these stats."""
        xin, ((w_pos, b_pos), (w_neg, b_neg)), signed = self._halves(op, x)
        weight = torch.cat([w_pos, w_neg])
        if self.beta == 0.0:
            z = op.forward(xin, w_pos, b_pos)
        else:  # one call gives both denominators
            z = op.forward(xin, weight, None if b_pos is None else torch.cat([b_pos, b_neg]))
        return {"inv": stabilized_reciprocal_(z, self.stabilizer), "weight": weight, "signed": signed}

    def backward(self, op, x, relevance, st, reuse=True):
        n = op.weight.shape[0]
        if self.beta != 0.0 and st["inv"].shape[1] == n:  # stats made for beta = 0: add the negative part
            xin, (_, (w_neg, b_neg)), _ = self._halves(op, x)
            negative = stabilized_reciprocal_(op.forward(xin, w_neg, b_neg), self.stabilizer)
            st["inv"] = torch.cat([st["inv"], negative], 1)
            del negative
        inv = st["inv"]
        if self.beta == 0.0:
            s = relevance * inv[:, :n]
            weight = st["weight"][:n]
        else:
            s = torch.empty_like(inv) if reuse else inv
            torch.mul(relevance, inv[:, :n], out=s[:, :n])
            torch.mul(relevance, inv[:, n:], out=s[:, n:])
            if self.alpha != 1.0:
                s[:, :n] *= self.alpha
            s[:, n:] *= -self.beta
            weight = st["weight"]
        return self._input_relevance(x, op.transpose(s, weight, self._stacked_shape(x, st["signed"])), st["signed"])


class ZPlus(AlphaBeta):
    """z+ rule (zennit's ZPlus; Montavon et al. 2017, Pattern Recognit. 65: 211-222): identical to alpha=1, beta=0,

        R_i = sum_j (x_i+ w_ij+ + x_i- w_ij-) / stab(sum_i x_i+ w_ij+ + x_i- w_ij- + b_j+) R_j."""

    def __init__(self, stabilizer: float = 1e-6, zero_bias: bool = False):
        super().__init__(1.0, 0.0, stabilizer, zero_bias)


class Gamma(_TwoCaseRule):
    """LRP-gamma (Montavon, Binder, Lapuschkin, Samek, Mueller: "Layer-wise relevance propagation: an overview",
    in Explainable AI, LNCS 11700, Springer 2019, pp. 193-209, Sec. 10.2.2), favouring positive contributions:

        R_i = sum_j x_i (w_ij + gamma w_ij+) / sum_i x_i (w_ij + gamma w_ij+) R_j      (x >= 0, z_j > 0),

    the bias counting as an input ``x_0 = 1`` in the denominator.

    Generalised to signed inputs and outputs exactly as zennit 0.5.1's ``zennit.rules.Gamma``: with
    ``u = w + gamma w+``, ``v = w + gamma w-`` and biases ``bu = b + gamma b+``, ``bv = b + gamma b-`` (0 with
    ``zero_bias``)

        z_j > 0:  R_i = sum_j (x_i+ u_ij + x_i- v_ij) / stab(sum_i x_i+ u_ij + x_i- v_ij + bu_j) R_j
        z_j < 0:  R_i = sum_j (x_i+ v_ij + x_i- u_ij) / stab(sum_i x_i+ v_ij + x_i- u_ij + bv_j) R_j
        z_j = 0:  no relevance,

    where ``z_j = sum_i x_i w_ij + b_j`` is the layer's output, bias included even with ``zero_bias`` (as zennit).
    ``gamma = 0`` is the epsilon-free LRP-0 split by output sign; large gamma approaches z+. The sign of ``z_j`` is
    taken from the two denominators, whose sum is ``(2 + gamma) z_j`` (``+ (2 + gamma) b_j`` with ``zero_bias``), so
    no extra convolution is needed; it can differ from zennit's directly computed ``z_j`` only where ``|z_j|`` is at
    rounding level, and such outputs carry (almost) no relevance.

    Where a ReLU follows the layer, the engine passes ``positive`` (``z_j > 0``, read off the ReLU's output that the
    trace keeps anyway): outputs with ``z_j <= 0`` have activation 0 and receive no relevance from the layers above,
    so only the first case is computed -- half the convolution of the stats. Should relevance arrive at such an
    output after all (a rule above that is not proportional to its input), the backward pass computes both cases;
    ``silent=True`` (the engine knows the layer above is proportional to its input) skips that check.
    """

    kind = "gamma"
    proportional = True

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6, zero_bias: bool = False):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        super().__init__(zero_bias)
        self.gamma, self.stabilizer = float(gamma), float(stabilizer)

    def cache_key(self):
        return super().cache_key() + (self.gamma, self.stabilizer)

    def _params(self, op):
        w, b, g = op.weight, self.bias(op), self.gamma
        return (w + g * w.clamp(min=0), w + g * w.clamp(max=0),
                None if b is None else b + g * b.clamp(min=0), None if b is None else b + g * b.clamp(max=0))

    def _factors_(self, z: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Denominators ``[case 1 | case 2]`` (output channels) -> ``[(z>0) / stab(case 1) | (z<0) / stab(case 2)]``
        in place; ``bias``: the layer's bias for these outputs."""
        n = z.shape[1] // 2
        total = z[:, :n] + z[:, n:]  # (2 + gamma) * (z - bias left out)
        if self.zero_bias and bias is not None:
            total.add_(_channel_view(bias, z.ndim), alpha=2.0 + self.gamma)
        not_positive, not_negative = total <= 0, total >= 0
        del total
        inv = stabilized_reciprocal_(z, self.stabilizer)
        inv[:, :n].masked_fill_(not_positive, 0.0)
        inv[:, n:].masked_fill_(not_negative, 0.0)
        return inv

    uses_output_sign = True  # the engine passes ``positive`` where it knows the sign of z_j from a following ReLU

    def stats(self, op: LinearOp, x: torch.Tensor, positive: torch.Tensor | None = None):
        xin, ((u, bu), (v, bv)), signed = self._halves(op, x)
        if positive is not None:  # z_j <= 0 carries no relevance: the first case only, zero where z_j <= 0
            z = op.forward(xin, u, bu)
            if positive.shape == z.shape:  # the factors at z_j <= 0 meet zero relevance (checked in backward)
                inv = stabilized_reciprocal_(z, self.stabilizer)
                return {"inv": inv, "weight": u, "signed": signed, "positive": positive}
            del z
        weight = torch.cat([u, v])
        z = op.forward(xin, weight, None if bu is None else torch.cat([bu, bv]))
        return {"inv": self._factors_(z, op.bias), "weight": weight, "signed": signed}

    @staticmethod
    def _reaches_nonpositive(relevance: torch.Tensor, positive: torch.Tensor) -> bool:
        return bool(relevance.masked_fill(positive, 0.0).any())

    def backward(self, op, x, relevance, st, reuse=True, silent=False):
        if "positive" in st:
            if not silent and self._reaches_nonpositive(relevance, st["positive"]):  # relevance at z <= 0: both cases
                return self.backward(op, x, relevance, self.stats(op, x), reuse=False)
            s = relevance * st["inv"]
            return self._input_relevance(x, op.transpose(s, st["weight"], self._stacked_shape(x, st["signed"])),
                                         st["signed"])
        n = op.weight.shape[0]
        inv = st["inv"]
        s_neg = relevance * inv[:, n:]
        if bool(s_neg.any()):  # relevance on outputs with z < 0 (none where a ReLU follows the layer)
            s = torch.cat([relevance * inv[:, :n], s_neg], 1)
            weight = st["weight"]
        else:  # half the transposed convolution
            del s_neg
            s = relevance * inv[:, :n]
            weight = st["weight"][:n]
        return self._input_relevance(x, op.transpose(s, weight, self._stacked_shape(x, st["signed"])), st["signed"])

    def backward_once(self, op: LinearOp, x: torch.Tensor, relevance: torch.Tensor,
                      positive: torch.Tensor | None = None, silent: bool = False) -> torch.Tensor:
        """Same result as ``backward(op, x, R, stats(op, x, positive))`` when the stats are not kept, in blocks of
        output channels of at most ``ONCE_BLOCK_ELEMENTS`` elements per case."""
        xin, ((u, bu), (v, bv)), signed = self._halves(op, x)
        channels = op.weight.shape[0]
        if (positive is not None and positive.shape == relevance.shape
                and (silent or not self._reaches_nonpositive(relevance, positive))):
            blocks = max(1, -(-relevance.numel() // ONCE_BLOCK_ELEMENTS))
            block = -(-channels // min(blocks, channels))
            grad = None
            for start in range(0, channels, block):
                part_of = slice(start, start + block)
                inv = stabilized_reciprocal_(op.forward(xin, u[part_of], None if bu is None else bu[part_of]),
                                             self.stabilizer)
                inv.mul_(relevance[:, part_of])
                part = op.transpose(inv, u[part_of], xin.shape)
                del inv
                grad = part if grad is None else grad.add_(part)
                del part
            return self._input_relevance(x, grad, signed)
        blocks = max(1, -(-2 * relevance.numel() // ONCE_BLOCK_ELEMENTS))
        block = -(-channels // min(blocks, channels))
        grad = None
        for start in range(0, channels, block):
            part_of = slice(start, start + block)
            weight = torch.cat([u[part_of], v[part_of]])
            bias = None if bu is None else torch.cat([bu[part_of], bv[part_of]])
            inv = self._factors_(op.forward(xin, weight, bias), None if op.bias is None else op.bias[part_of])
            m = inv.shape[1] // 2
            r = relevance[:, part_of]
            inv[:, m:].mul_(r)
            if bool(inv[:, m:].any()):
                inv[:, :m].mul_(r)
                part = op.transpose(inv, weight, xin.shape)
            else:
                part = op.transpose(inv[:, :m].mul_(r), weight[:m], xin.shape)
            del inv
            grad = part if grad is None else grad.add_(part)
            del part
        return self._input_relevance(x, grad, signed)


class Epsilon(Rule):
    """epsilon rule (Bach et al. 2015): ``R_i = sum_j x_i w_ij / stab(z_j, epsilon) R_j`` with
    ``z_j = sum_i x_i w_ij + b_j`` (``b_j = 0`` with ``zero_bias``)."""

    kind = "epsilon"
    proportional = True

    def __init__(self, epsilon: float = 1e-6, zero_bias: bool = False):
        super().__init__(zero_bias)
        self.epsilon = float(epsilon)

    def cache_key(self):
        return super().cache_key() + (self.epsilon,)

    def stats(self, op, x):
        return stabilized_reciprocal_(op.forward(x, op.weight, self.bias(op)), self.epsilon)

    def backward(self, op, x, relevance, inv, reuse=True):
        return x * op.transpose(relevance * inv, op.weight, x.shape)


class ZBox(Rule):
    """z^B rule (Montavon et al. 2017, Pattern Recognit. 65: 211-222) for inputs bounded by ``l <= x <= h``:

        R_i = sum_j (x_i w_ij - l_i w_ij+ - h_i w_ij-) / stab(sum_i x_i w_ij - l_i w_ij+ - h_i w_ij-) R_j.

    ``low``/``high``: floats, tensors broadcastable to one sample, or "auto" for each sample's own minimum/maximum.
    Computed as ``(x - l) w+ + (x - h) w-`` (one convolution of the input channels ``[x - l, x - h]`` against
    ``[w+, w-]``, one transpose); zero padding pads ``l`` and ``h`` with zeros as zennit does. zennit subtracts
    ``l w+ + b+`` and ``h w- + b-`` from ``x w + b``, so the bias cancels: ``zero_bias`` changes nothing."""

    kind = "zbox"

    def __init__(self, low=-1.0, high=1.0, stabilizer: float = 1e-6, zero_bias: bool = False):
        super().__init__(zero_bias)
        self.low, self.high, self.stabilizer = low, high, float(stabilizer)

    def cache_key(self):
        return (self.kind, repr(self.low), repr(self.high), self.stabilizer)

    def _bounds(self, x):
        dims = tuple(range(1, x.ndim))
        low = (x.amin(dim=dims, keepdim=True) if isinstance(self.low, str) and self.low == "auto"
               else torch.as_tensor(self.low, dtype=x.dtype, device=x.device))
        high = (x.amax(dim=dims, keepdim=True) if isinstance(self.high, str) and self.high == "auto"
                else torch.as_tensor(self.high, dtype=x.dtype, device=x.device))
        return low.expand_as(x), high.expand_as(x)

    @staticmethod
    def _groups(op):
        return op.kwargs.get("groups", 1)

    def _shifted(self, op, x):
        low, high = self._bounds(x)
        return _interleave(x - low, x - high, self._groups(op))

    @staticmethod
    def _weight(op):
        return torch.cat([op.weight.clamp(min=0), op.weight.clamp(max=0)], 1)

    def stats(self, op, x):
        return stabilized_reciprocal_(op.forward(self._shifted(op, x), self._weight(op)), self.stabilizer)

    def backward(self, op, x, relevance, inv, reuse=True):
        shifted = self._shifted(op, x)
        grad = op.transpose(relevance * inv, self._weight(op), shifted.shape).mul_(shifted)
        above_low, below_high = _deinterleave(grad, self._groups(op))
        return above_low + below_high


class WSquare(Rule):
    """w^2 rule (Montavon et al. 2017; first layer, unbounded input):
    ``R_i = sum_j w_ij^2 / stab(sum_i w_ij^2 + b_j^2) R_j`` (``b_j = 0`` with ``zero_bias``)."""

    kind = "wsquare"

    def __init__(self, stabilizer: float = 1e-6, zero_bias: bool = False):
        super().__init__(zero_bias)
        self.stabilizer = float(stabilizer)

    def _params(self, op):
        bias = self.bias(op)
        return op.weight**2, (bias**2 if bias is not None else None)

    def stats(self, op, x):
        weight, bias = self._params(op)
        return {"z": op.forward(torch.ones_like(x), weight, bias), "weight": weight}

    def backward(self, op, x, relevance, st, reuse=True):
        return op.transpose(relevance / stabilize(st["z"], self.stabilizer), st["weight"], x.shape)


class Flat(Rule):
    """flat rule (Lapuschkin et al. 2019, Nat. Commun. 10: 1096; first layer): relevance spread uniformly over the
    receptive field, ``R_i = sum_j 1 / stab(sum_i 1) R_j`` (zero-padded positions do not count). As zennit's
    ``Flat``, biases are never used (``zero_bias`` is implied). All weights being 1, every output channel has the
    same denominator, the transpose needs only the sum of the output channels, and for convolutions with stride 1
    and dilation 1 the all-ones kernel is separable: counts and transposes are box sums along each axis."""

    kind = "flat"

    def __init__(self, stabilizer: float = 1e-6, zero_bias: bool = False):
        super().__init__(zero_bias)
        self.stabilizer = float(stabilizer)

    def cache_key(self):
        return (self.kind, self.stabilizer)

    @staticmethod
    def _ones(op):
        return torch.ones_like(op.weight if op.kwargs.get("groups", 1) != 1 else op.weight[:1])

    @staticmethod
    def _separable(op):
        """[(kernel size, padding)] per spatial axis for an ungrouped convolution with stride 1, dilation 1 and
        padding < kernel size; None otherwise."""
        if not op.is_conv or op.kwargs.get("groups", 1) != 1:
            return None
        dims = op.weight.ndim - 2
        stride, padding, dilation = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
                                     for v in (op.kwargs.get("stride", 1), op.kwargs.get("padding", 0),
                                               op.kwargs.get("dilation", 1)))
        kernel = tuple(op.weight.shape[2:])
        if any(st != 1 for st in stride) or any(d != 1 for d in dilation):
            return None
        if any(p >= k for p, k in zip(padding, kernel)):
            return None
        return list(zip(kernel, padding))

    def stats(self, op, x):
        separable = self._separable(op)
        if separable is None:
            return stabilized_reciprocal_(op.forward(torch.ones_like(x[:1]), self._ones(op)), self.stabilizer)
        counts = torch.full((1,) * x.ndim, float(x.shape[1]), dtype=x.dtype, device=x.device)
        for axis, (k, p) in enumerate(separable, start=2):  # in-range kernel positions along this axis
            length = x.shape[axis]
            out = torch.arange(length + 2 * p - k + 1, device=x.device)
            along = (torch.clamp(length + p - out, max=k) - torch.clamp(p - out, min=0)).to(x.dtype)
            counts = counts * along.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        return stabilized_reciprocal_(counts, self.stabilizer)

    def backward(self, op, x, relevance, inv, reuse=True):
        ones = self._ones(op)
        if ones.shape[0] != 1:  # grouped convolution
            return op.transpose(relevance * inv, ones, x.shape)
        s = relevance.sum(1, keepdim=True).mul_(inv)
        separable = self._separable(op)
        if separable is None:
            return op.transpose(s, ones, x.shape)
        for axis, (k, p) in enumerate(separable, start=2):
            s = _box_transpose(s, axis, k, p)
        return s.expand(x.shape).clone()


def _box_transpose(s: torch.Tensor, axis: int, kernel: int, padding: int) -> torch.Tensor:
    """Transpose of a stride-1 convolution with an all-ones kernel along ``axis``: ``g[i] = sum_j s[i + p - j]``,
    j < kernel, i.e. a box sum over ``s`` zero-padded by ``kernel - 1 - padding`` on both sides."""
    pad = kernel - 1 - padding
    shape = list(s.shape)
    shape[axis] += 2 * pad
    padded = s.new_zeros(shape)
    padded.narrow(axis, pad, s.shape[axis]).copy_(s)
    length = shape[axis] - kernel + 1
    out = padded.narrow(axis, 0, length).clone()
    for j in range(1, kernel):
        out += padded.narrow(axis, j, length)
    return out
