"""Stride-2 convolutions that halve an image and transposed convolutions that undo it exactly.

The convolutional autoencoder and the DCGAN both go down to a small grid and back up to the input's
size. A kernel-4, stride-2, padding-1 convolution maps a side s to floor(s / 2); its transposed twin maps
s' back to 2 s' + output_padding, so choosing output_padding per stage restores odd sides too (7 → 3 → 7).
"""
from __future__ import annotations

from torch import nn

from models.base import ArchitectureError

KERNEL, STRIDE, PADDING = 4, 2, 1


def halving_sizes(spatial: tuple[int, ...], stages: int, field: str) -> list[tuple[int, ...]]:
    """Spatial size before each stage and after the last: [input, after 1, ..., after `stages`]."""
    sizes = [tuple(spatial)]
    for i in range(stages):
        nxt = tuple((s + 2 * PADDING - KERNEL) // STRIDE + 1 for s in sizes[-1])
        if min(nxt) < 1:
            raise ArchitectureError(field, f"{stages} stride-2 stages do not fit an input of size "
                                    f"{'x'.join(map(str, spatial))}: stage {i + 1} would get "
                                    f"{'x'.join(map(str, sizes[-1]))}; use fewer stages")
        sizes.append(nxt)
    return sizes


def conv_down(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    """(B, c_in, H, W) → (B, c_out, H // 2, W // 2)."""
    return nn.Conv2d(c_in, c_out, KERNEL, STRIDE, PADDING, bias=bias)


def conv_up(c_in: int, c_out: int, size_in: tuple[int, ...], size_out: tuple[int, ...], bias: bool = True
            ) -> nn.ConvTranspose2d:
    """(B, c_in, *size_in) → (B, c_out, *size_out), where size_in came from size_out by conv_down."""
    extra = tuple(o - STRIDE * i for i, o in zip(size_in, size_out))  # 0 for even sides, 1 for odd
    return nn.ConvTranspose2d(c_in, c_out, KERNEL, STRIDE, PADDING, output_padding=extra, bias=bias)
