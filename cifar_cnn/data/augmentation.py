"""Augmentation of training batches: batched tensor ops on the images' device."""

import torch
import torch.nn.functional as F
from torch import Tensor


def augment(images: Tensor, flip: bool, padding: int) -> Tensor:
    """Per image: a random horizontal flip, and a random shift of up to `padding` pixels (a
    crop of the reflect-padded image). Draws from torch's global generator."""
    count, channels, height, width = images.shape
    device = images.device
    if flip:
        flipped = torch.rand(count, device=device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    if padding:
        padded = F.pad(images, (padding,) * 4, mode="reflect")
        top, left = torch.randint(0, 2 * padding + 1, (2, count, 1), device=device)
        rows = top + torch.arange(height, device=device)  # (count, height)
        columns = left + torch.arange(width, device=device)  # (count, width)
        images = padded[
            torch.arange(count, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]
    return images
