"""Linear operators the rules act on: a convolution or fully connected layer with (possibly BN-folded) weights,
as the pair "forward with given weights" / "transpose (gradient w.r.t. the input) with given weights"."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearOp", "bn_folded_copy", "linear_op"]

_CONV = {1: (F.conv1d, torch.nn.grad.conv1d_input), 2: (F.conv2d, torch.nn.grad.conv2d_input),
         3: (F.conv3d, torch.nn.grad.conv3d_input)}
FLIPPED_MIN_VOXELS = 16384  # transposes of 3D convolutions on at least this many voxels run as flipped convolutions


def _ntuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@dataclass
class LinearOp:
    """``forward(x, w, b)`` and ``transpose(s, w, input_shape)`` of one conv/linear layer; ``weight``/``bias`` are
    the layer's effective parameters (BatchNorm folded in when it follows the layer)."""

    module: nn.Module
    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    kwargs: dict = field(default_factory=dict)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.modules.conv._ConvNd)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_conv:
            return _CONV[weight.ndim - 2][0](x, weight, bias, **self.kwargs)
        return F.linear(x, weight, bias)

    def transpose(self, s: torch.Tensor, weight: torch.Tensor, input_shape) -> torch.Tensor:
        if self.is_conv:
            padding = self._flipped_padding(weight, input_shape)
            if padding is not None:  # the same map as a forward convolution with the flipped kernel
                flipped = weight.flip(tuple(range(2, weight.ndim))).transpose(0, 1)
                dilation = self.kwargs.get("dilation", 1)
                return _CONV[weight.ndim - 2][0](s, flipped, None, padding=padding, dilation=dilation)
            return _CONV[weight.ndim - 2][1](tuple(input_shape), weight, s, **self.kwargs)
        return s @ weight

    def _flipped_padding(self, weight: torch.Tensor, input_shape) -> tuple | None:
        """Padding of the forward convolution with the flipped kernel that equals the transpose of this one, where
        that is valid (stride 1, no groups, padding <= dilation * (kernel - 1)) and measured faster: 3D volumes of
        at least ``FLIPPED_MIN_VOXELS`` voxels (torch 2.13 CPU: 1.3-2x faster than the transposed convolution there,
        slower on small volumes)."""
        dims = weight.ndim - 2
        if dims != 3 or self.kwargs.get("groups", 1) != 1 or math.prod(input_shape[2:]) < FLIPPED_MIN_VOXELS:
            return None
        stride, padding, dilation = (_ntuple(self.kwargs.get(key, default), dims)
                                     for key, default in (("stride", 1), ("padding", 0), ("dilation", 1)))
        if any(st != 1 for st in stride):
            return None
        flipped = tuple(d * (k - 1) - p for d, k, p in zip(dilation, weight.shape[2:], padding))
        return flipped if min(flipped) >= 0 else None


def linear_op(module: nn.Module, name: str, batchnorm: nn.Module | None = None) -> LinearOp:
    """Effective weights of ``module`` (Conv/Linear), with ``batchnorm`` folded in if given. New tensors are
    returned; the module, its parameters and its state_dict are never touched."""
    with torch.no_grad():
        weight = module.weight.detach().clone()
        bias = module.bias.detach().clone() if module.bias is not None else None
        if batchnorm is not None:
            scale = torch.ones_like(batchnorm.running_var) if batchnorm.weight is None else batchnorm.weight.detach()
            shift = torch.zeros_like(batchnorm.running_mean) if batchnorm.bias is None else batchnorm.bias.detach()
            factor = scale / torch.sqrt(batchnorm.running_var + batchnorm.eps)
            weight = weight * factor.view(-1, *([1] * (weight.ndim - 1)))
            base = bias if bias is not None else torch.zeros_like(batchnorm.running_mean)
            bias = (base - batchnorm.running_mean) * factor + shift
    kwargs = {}
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise NotImplementedError(f"LRP: {name} ({type(module).__name__}) uses padding={module.padding!r}, "
                                      f"padding_mode={module.padding_mode!r}; only numeric zero padding is supported")
        kwargs = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    return LinearOp(module, name, weight, bias, kwargs)


def bn_folded_copy(model: nn.Sequential) -> nn.Sequential:
    """A copy of a Sequential with every BatchNorm folded into the conv/linear layer before it and replaced by
    Identity (the reference network for comparisons with other LRP implementations); ``model`` is untouched."""
    folded = copy.deepcopy(model).eval()
    layers = list(folded)
    for i, module in enumerate(layers):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            op = linear_op(layers[i - 1], str(i - 1), module)
            with torch.no_grad():
                layers[i - 1].weight.copy_(op.weight)
                if layers[i - 1].bias is None:
                    layers[i - 1].bias = nn.Parameter(op.bias)
                else:
                    layers[i - 1].bias.copy_(op.bias)
            folded[i] = nn.Identity()
    return folded
