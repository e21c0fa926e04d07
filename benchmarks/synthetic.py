"""Synthetic ImageNet-like JPEGs for the benchmarks: about 500x375, ~90-110 KB (smooth colour fields
plus noise, so that they compress like photographs rather than like flat colour or pure noise)."""

import io

import numpy as np
from PIL import Image

_YY, _XX = np.mgrid[0:375, 0:500].astype(np.float32)


def photo_jpeg(i: int, rng: np.random.Generator, quality: int = 90) -> bytes:
    a, b, c = rng.uniform(0.01, 0.05, 3)
    base = np.stack([np.sin(_XX * a + i), np.cos(_YY * b), np.sin((_XX + _YY) * c)], -1) * 90 + 128
    img = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def gray_jpeg(rng: np.random.Generator, size: int = 28) -> bytes:
    """A Fashion-MNIST-shaped image: size x size grayscale noise, JPEG quality 100."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, format="JPEG", quality=100)
    return buf.getvalue()
