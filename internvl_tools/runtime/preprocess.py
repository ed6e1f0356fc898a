"""InternVL image preprocessing: 448 px tiles by aspect ratio (dynamic), thumbnail, ImageNet norm.

Re-stated from the model cards: the grid (i, j) with min_num <= i*j <= max_num whose aspect
ratio is closest to the image's wins (ties go to the larger grid when the image has more than
half its area); the image is resized to that grid, cut into tiles row by row, and a thumbnail
of the whole image is appended when there is more than one tile.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def target_grid(width: int, height: int, size: int, min_num: int, max_num: int) -> tuple[int, int]:
    """(columns, rows) of the tile grid for an image."""
    aspect = width / height
    grids = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if min_num <= i * j <= max_num}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and width * height > 0.5 * size * size * grid[0] * grid[1]:
            best = grid
    return best


def tiles(image: Image.Image, size: int, min_num: int = 1, max_num: int = 12, thumbnail: bool = True) -> list[Image.Image]:
    """Cut an image into size x size tiles (plus a thumbnail) as InternVL2's dynamic mode does."""
    cols, rows = target_grid(image.width, image.height, size, min_num, max_num)
    resized = image.resize((size * cols, size * rows))
    out = [resized.crop(((i % cols) * size, (i // cols) * size, (i % cols + 1) * size, (i // cols + 1) * size))
           for i in range(cols * rows)]
    if thumbnail and len(out) != 1:
        out.append(image.resize((size, size)))
    return out


def to_tensor(tile: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize to size x size, [0, 1], ImageNet mean/std normalisation: [3, size, size]."""
    resized = tile.convert("RGB").resize((size, size), Image.BICUBIC)
    array = (np.asarray(resized, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def pixel_values(image: Image.Image, config: dict) -> torch.Tensor:
    """[tiles, 3, size, size] for an image, per the config's dynamic_image_size settings."""
    size = config.get("force_image_size") or config["vision_config"]["image_size"]
    image = image.convert("RGB")
    if config.get("dynamic_image_size"):
        parts = tiles(image, size, config.get("min_dynamic_patch", 1), config.get("max_dynamic_patch", 12),
                      config.get("use_thumbnail", False))
    else:
        parts = [image]
    return torch.stack([to_tensor(part, size) for part in parts])
