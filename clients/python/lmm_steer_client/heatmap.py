"""Draw a feature's patch grid (from ``inspect``) over its image. Needs Pillow."""

from __future__ import annotations


def render_heatmap(image, grid: list[list[float]], *, alpha: float = 0.55):
    """The image with the grid's activations overlaid in red, upsampled to the image's size."""
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError("heatmaps need Pillow: pip install 'lmm-steer-client[heatmap]'") from None
    base = (Image.open(image) if not hasattr(image, "size") else image).convert("RGB")
    rows, cols = len(grid), len(grid[0]) if grid else 0
    peak = max((v for row in grid for v in row), default=0.0) or 1.0
    cells = bytes(int(255 * max(0.0, v) / peak) for row in grid for v in row)
    heat = Image.frombytes("L", (cols, rows), cells).resize(base.size, Image.BILINEAR)
    red = Image.new("RGB", base.size, (255, 0, 0))
    mask = heat.point(lambda p: int(p * alpha))
    return Image.composite(red, base, mask)
