"""Pixel normalisation on the accelerator: loaders ship uint8 (4x less data), modules normalise once on device."""

from __future__ import annotations

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8 ``[..., 3, H, W]`` -> float32 normalised with ImageNet mean/std; float input is taken as normalised."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std).view(3, 1, 1) * 255.0), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            return images
        return (images.float() - self.mean) * self.inv_std
