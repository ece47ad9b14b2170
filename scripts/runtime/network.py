"""The 3D CNN of Grigorescu et al.: conv3x3x3 -> BatchNorm -> ReLU -> 2x2x2 average pooling blocks,
then two fully connected layers that give one logit per class (softmax is post-processing).

Every operation is a module, in execution order, so that the LRP engine (``scripts.lrp``) can walk the
network as a chain: ReLU, pooling and Flatten are modules, never functional calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PretermCNN", "flat_features", "from_torchscript"]


def flat_features(spatial_shape: Sequence[int], channels: Sequence[int]) -> int:
    """Number of features entering the first fully connected layer for ``spatial_shape``."""
    size = 1
    for dim in spatial_shape:
        reduced = int(dim)
        for _ in channels:
            reduced //= 2
        if reduced < 1:
            raise ValueError(
                f"spatial_shape {tuple(spatial_shape)} is too small for {len(channels)} pooling blocks "
                f"(each halves every side); use fewer channels entries or a larger input"
            )
        size *= reduced
    return size * int(channels[-1])


class PretermCNN(nn.Sequential):
    """Term/preterm classifier for 1 mm neonatal T2w volumes.

    Args:
        spatial_shape: input volume size (D, H, W); the first FC size is derived from it.
        in_channels: image channels (1 for T2w).
        out_channels: number of classes (2: 0 term, 1 preterm).
        channels: output channels of each conv block; its length is the network depth.
        hidden: width of the first fully connected layer.
        dropout: dropout probability before the last layer (0 disables it).
    """

    def __init__(
        self,
        spatial_shape: Sequence[int] = (128, 96, 96),
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (8, 16, 32, 64, 64),
        hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        if len(spatial_shape) != 3:
            raise ValueError(f"spatial_shape must have 3 entries (D, H, W), got {spatial_shape!r}")
        if not channels:
            raise ValueError("channels must list at least one conv block")
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.Conv3d(previous, int(width), kernel_size=3, stride=1, padding=1),
                nn.BatchNorm3d(int(width)),
                nn.ReLU(),
                nn.AvgPool3d(kernel_size=2, stride=2),
            ]
            previous = int(width)
        layers += [nn.Flatten(), nn.Linear(flat_features(spatial_shape, channels), hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, out_channels))
        super().__init__(*layers)
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self._expected: list[int] = [int(s) for s in spatial_shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # TorchScript-compatible (models/model.ts)
        if x.dim() != 5:
            raise ValueError("PretermCNN expects a 5D tensor (batch, channel, D, H, W), got shape " + str(x.shape))
        if list(x.shape[2:]) != self._expected:
            raise ValueError("PretermCNN was built for spatial shape " + str(self._expected) + ", got "
                             + str(list(x.shape[2:])))
        for layer in self:
            x = layer(x)
        return x


def from_torchscript(scripted: torch.jit.ScriptModule) -> PretermCNN:
    """Rebuild the eager :class:`PretermCNN` inside an exported ``model.ts`` (``ckpt_export``), with its weights.

    LRP walks eager modules with hooks, which a ScriptModule does not run; the architecture is read back from the
    exported module itself (conv widths, hidden width, dropout, and the spatial shape it was built for), so a
    ``model.ts`` exported with any overrides is explained exactly as exported.
    """
    children = list(scripted.named_children())
    kinds = [getattr(child, "original_name", type(child).__name__) for _, child in children]
    state = scripted.state_dict()
    convs = [name for (name, _), kind in zip(children, kinds) if kind == "Conv3d"]
    linears = [name for (name, _), kind in zip(children, kinds) if kind == "Linear"]
    if not convs or len(linears) != 2:
        raise ValueError(f"not an exported PretermCNN: layers {kinds}")
    dropout = [child for (_, child), kind in zip(children, kinds) if kind == "Dropout"]
    network = PretermCNN(
        spatial_shape=[int(s) for s in scripted._expected],
        in_channels=int(state[f"{convs[0]}.weight"].shape[1]),
        out_channels=int(state[f"{linears[1]}.weight"].shape[0]),
        channels=[int(state[f"{name}.weight"].shape[0]) for name in convs],
        hidden=int(state[f"{linears[0]}.weight"].shape[0]),
        dropout=float(dropout[0].p) if dropout else 0.0,
    )
    network.load_state_dict(state, strict=True)
    return network.eval()
