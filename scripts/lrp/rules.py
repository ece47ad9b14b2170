"""LRP rules for linear layers (conv / fully connected), written as explicit forward/transpose computations.

Every rule follows zennit's definitions exactly (same stabiliser, same handling of biases and of negative
inputs), so its maps can be checked against zennit:

- stabiliser: ``z + eps * sign(z)`` with ``sign(0) = +1`` (:func:`stabilize`).
- :class:`AlphaBeta` (alpha - beta = 1, beta >= 0): positive part ``x+ w+ + b+ + x- w-``, negative part
  ``x+ w- + b- + x- w+``; the ``x-`` terms are skipped when the input is non-negative (they are exactly 0).
- :class:`Epsilon`, :class:`ZPlus` (= alpha1beta0), and first-layer rules :class:`ZBox` (z^B with low/high),
  :class:`WSquare`, :class:`Flat`.

A rule's ``stats(op, x)`` holds the layer quantities that do not depend on the relevance (denominators); the
engine caches them so that several presets sharing a rule kind, and several targets, reuse them.
"""

from __future__ import annotations

import torch

from scripts.lrp.layers import LinearOp

__all__ = ["AlphaBeta", "Epsilon", "Flat", "Rule", "WSquare", "ZBox", "ZPlus", "stabilize"]


ONCE_BLOCK_ELEMENTS = 1 << 24  # at most 64 MiB of float32 per block of output channels in AlphaBeta.backward_once;
# smaller blocks lower the peak memory of a single map further but cost one more (slow) transposed conv each


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """zennit's stabiliser: add ``eps`` with the sign of ``z`` (``+eps`` where ``z == 0``)."""
    return z + torch.where(z >= 0, eps, -eps).to(z.dtype)


def stabilized_reciprocal_(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / stabilize(z, eps)`` computed in place, one channel at a time to keep temporaries small."""
    for channel in z.unbind(1) if z.ndim > 2 else (z,):
        channel.add_(torch.where(channel >= 0, eps, -eps).to(z.dtype))
    return z.reciprocal_()


def _cat_bias(*biases):
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    return torch.cat([b if b is not None else torch.zeros_like(ref) for b in biases])


class Rule:
    """Base class: ``backward(op, x, relevance, stats) -> input relevance``."""

    kind: str = "rule"  # rules with the same kind share cached stats

    def stats(self, op: LinearOp, x: torch.Tensor):
        return None

    def cache_key(self) -> tuple:
        """Rules with equal keys compute equal ``stats`` for the same layer input."""
        return (self.kind,)

    def backward(self, op: LinearOp, x: torch.Tensor, relevance: torch.Tensor, stats, reuse: bool = True) -> torch.Tensor:
        """``reuse=False``: ``stats`` will not be used again and may be overwritten (saves memory)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class AlphaBeta(Rule):
    """alpha-beta rule: ``alpha * positive share - beta * negative share`` with alpha - beta = 1, beta >= 0.

    Both denominators come from one call: output channels ``[w+; w-]``; for signed input (a first layer on
    standardised images) the input is stacked as channels ``[x+, x-]`` against ``[[w+, w-], [w-, w+]]``, which
    also keeps single-channel 3D input on the fast convolution path. The stats do not depend on alpha/beta, so
    every alpha-beta preset reuses them."""

    kind = "alphabeta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if abs((alpha - beta) - 1.0) > 1e-12:
            raise ValueError(f"alpha - beta must equal 1, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def cache_key(self):
        return (self.kind, self.stabilizer)

    def _halves(self, op: LinearOp, x: torch.Tensor):
        """(input as the rule sees it, [(weight, bias) of the positive part, of the negative part], signed)."""
        w_pos, w_neg = op.weight.clamp(min=0), op.weight.clamp(max=0)
        b_pos = None if op.bias is None else op.bias.clamp(min=0)
        b_neg = None if op.bias is None else op.bias.clamp(max=0)
        signed = bool((x < 0).any())
        if signed:
            if op.kwargs.get("groups", 1) != 1:
                raise NotImplementedError(f"LRP alpha-beta on signed input: grouped convolution {op.name} is not supported")
            x = torch.cat([x.clamp(min=0), x.clamp(max=0)], 1)
            return x, [(torch.cat([w_pos, w_neg], 1), b_pos), (torch.cat([w_neg, w_pos], 1), b_neg)], signed
        return x, [(w_pos, b_pos), (w_neg, b_neg)], signed

    @staticmethod
    def _input_relevance(x, grad, signed):
        if not signed:
            return grad.mul_(x)
        g_pos, g_neg = grad.chunk(2, 1)
        return x.clamp(min=0).mul_(g_pos).add_(x.clamp(max=0).mul_(g_neg))

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
                s = stabilized_reciprocal_(op.forward(xin, w, b), self.stabilizer).mul_(relevance[:, start:start + block])
                if coef != 1.0:
                    s.mul_(coef)
                part = op.transpose(s, w, xin.shape)
                del s
                grad = part if grad is None else grad.add_(part)
                del part
        return self._input_relevance(x, grad, signed)

    def stats(self, op: LinearOp, x: torch.Tensor):
        xin, ((w_pos, b_pos), (w_neg, b_neg)), signed = self._halves(op, x)
        weight = torch.cat([w_pos, w_neg])  # one call gives both denominators
        bias = None if b_pos is None else torch.cat([b_pos, b_neg])
        z = op.forward(xin, weight, bias)
        return {"inv": stabilized_reciprocal_(z, self.stabilizer), "weight": weight, "signed": signed}

    def backward(self, op, x, relevance, st, reuse=True):
        n = op.weight.shape[0]
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
        shape = (x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:]) if st["signed"] else x.shape
        return self._input_relevance(x, op.transpose(s, weight, shape), st["signed"])


class ZPlus(AlphaBeta):
    """z+ rule (zennit's ZPlus): identical to alpha=1, beta=0."""

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__(1.0, 0.0, stabilizer)


class Epsilon(Rule):
    """epsilon rule: ``R_in = x * W^T (R / (z + eps sign z))``."""

    kind = "epsilon"

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    def cache_key(self):
        return (self.kind, self.epsilon)

    def stats(self, op, x):
        return stabilized_reciprocal_(op.forward(x, op.weight, op.bias), self.epsilon)

    def backward(self, op, x, relevance, inv, reuse=True):
        return x * op.transpose(relevance * inv, op.weight, x.shape)


class ZBox(Rule):
    """z^B rule for inputs bounded by ``low`` <= x <= ``high`` (floats, or tensors broadcastable to one sample).
    ``low``/``high`` = "auto" take each sample's own minimum/maximum."""

    kind = "zbox"

    def cache_key(self):
        return (self.kind, repr(self.low), repr(self.high))

    def __init__(self, low=-1.0, high=1.0, stabilizer: float = 1e-6):
        self.low, self.high, self.stabilizer = low, high, float(stabilizer)

    def _bounds(self, x):
        dims = tuple(range(1, x.ndim))
        low = x.amin(dim=dims, keepdim=True) if self.low == "auto" else torch.as_tensor(self.low, dtype=x.dtype, device=x.device)
        high = x.amax(dim=dims, keepdim=True) if self.high == "auto" else torch.as_tensor(self.high, dtype=x.dtype, device=x.device)
        return low.expand_as(x), high.expand_as(x)

    def stats(self, op, x):
        low, high = self._bounds(x)
        w_pos, w_neg = op.weight.clamp(min=0), op.weight.clamp(max=0)
        b = op.bias
        z = op.forward(x, op.weight, b)
        z = z - op.forward(low, w_pos, b.clamp(min=0) if b is not None else None)
        z = z - op.forward(high, w_neg, b.clamp(max=0) if b is not None else None)
        return {"z": z, "low": low, "high": high, "w_pos": w_pos, "w_neg": w_neg}

    def backward(self, op, x, relevance, st, reuse=True):
        s = relevance / stabilize(st["z"], self.stabilizer)
        return (x * op.transpose(s, op.weight, x.shape) - st["low"] * op.transpose(s, st["w_pos"], x.shape)
                - st["high"] * op.transpose(s, st["w_neg"], x.shape))


class WSquare(Rule):
    """w^2 rule (first layer, unbounded input): relevance spread by squared weights."""

    kind = "wsquare"

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = float(stabilizer)

    def _params(self, op):
        return op.weight**2, (op.bias**2 if op.bias is not None else None)

    def stats(self, op, x):
        weight, bias = self._params(op)
        return {"z": op.forward(torch.ones_like(x), weight, bias), "weight": weight}

    def backward(self, op, x, relevance, st, reuse=True):
        return op.transpose(relevance / stabilize(st["z"], self.stabilizer), st["weight"], x.shape)


class Flat(WSquare):
    """flat rule (first layer): relevance spread uniformly over the receptive field."""

    kind = "flat"

    def _params(self, op):
        return torch.ones_like(op.weight), (torch.ones_like(op.bias) if op.bias is not None else None)
