"""LayerSpec: the geometry of a frozen Linear / Conv2d layer, computed once per wrapped layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

Padding = Union[tuple[int, int], str]


@dataclass(frozen=True)
class LayerSpec:
    """Shape and convolution arguments of the layer an adapter modifies."""

    kind: str  # "linear" or "conv"
    out_features: int
    in_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: Padding = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"

    @property
    def has_spatial_kernel(self) -> bool:
        """True for k x k convolutions with k > 1 (the ones that get conv_rank and Tucker forms)."""
        return self.is_conv and self.kernel_size != (1, 1)

    @property
    def kernel_numel(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, self.in_features, *self.kernel_size)
        return (self.out_features, self.in_features)

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's own operation (F.linear or F.conv2d with its stride/padding/dilation)."""
        if not self.is_conv:
            return F.linear(x, weight, bias)
        x, padding = self.pad_input(x)
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation)

    def pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Padding]:
        """A conv input padded for non-zero padding modes, and the padding left for F.conv2d itself."""
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, _reversed_padding(self.padding), mode=self.padding_mode), (0, 0)

    def apply_pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A 1x1 projection over channels (dim 1 for conv inputs, last dim for linear inputs)."""
        if not self.is_conv:
            return F.linear(x, weight.flatten(1))
        return F.conv2d(x, weight.reshape(weight.shape[0], weight.shape[1], 1, 1))

    @classmethod
    def from_module(cls, module: nn.Module) -> "LayerSpec":
        if isinstance(module, nn.Linear):
            return cls("linear", module.out_features, module.in_features)
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ValueError(
                    f"grouped convolutions (groups={module.groups}) cannot carry a low-rank adapter; "
                    "exclude this module from the targets"
                )
            return cls(
                "conv",
                module.out_channels,
                module.in_channels,
                kernel_size=tuple(module.kernel_size),
                stride=tuple(module.stride),
                padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
                dilation=tuple(module.dilation),
                padding_mode=module.padding_mode,
            )
        raise TypeError(f"only nn.Linear and nn.Conv2d can be adapted, got {type(module).__name__}")


def _reversed_padding(padding: Padding) -> tuple[int, int, int, int]:
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r} with a non-zero padding_mode is not supported")
    ph, pw = padding
    return (pw, pw, ph, ph)
