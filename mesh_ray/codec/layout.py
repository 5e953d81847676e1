"""Token layout: split [B, T, C] into the leading (text) tokens and the image tokens on their grid."""

from __future__ import annotations

import math

import torch

from mesh_ray.codec.errors import CodecError


def as_3d(x: torch.Tensor) -> torch.Tensor:
    """[T, C] -> [1, T, C]; [B, T, C] unchanged; anything else is a CodecError."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    raise CodecError(f"codec takes [B, tokens, channels] or [tokens, channels] tensors, got shape "
                     f"{tuple(x.shape)}: reshape it first")


def split_tokens(tokens: int, grid: tuple[int, int] | None, txt_len: int) -> int:
    """How many leading (non-image) tokens there are; checks grid and txt_len agree with the shape."""
    if grid is None:
        if not 0 <= txt_len <= tokens:
            raise CodecError(f"txt_len={txt_len} is outside 0..{tokens} tokens: pass the text token count")
        return txt_len
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or h * w > tokens:
        raise CodecError(f"grid {h}x{w} needs {h * w} image tokens but the tensor has {tokens}: "
                         "pass the latent's token grid (height/16, width/16)")
    prefix = tokens - h * w
    if txt_len not in (0, prefix):
        raise CodecError(f"txt_len={txt_len} but grid {h}x{w} leaves {prefix} leading tokens of {tokens}: "
                         f"pass txt_len={prefix} or the right grid")
    return prefix


def square_grid(n: int) -> tuple[int, int]:
    """A near-square (h, w) with h * w >= n, for tokens that come without a grid."""
    if n == 0:
        return 0, 0
    w = math.isqrt(n - 1) + 1
    return -(-n // w), w


def to_grid(img: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image tokens [B, N, C] -> channel-major [B, C, h, w] (padding by repeating the last token)."""
    b, n, c = img.shape
    h, w = grid
    if h * w > n:
        img = torch.cat((img, img[:, -1:].expand(b, h * w - n, c)), dim=1)
    return img.transpose(1, 2).reshape(b, c, h, w)


def from_grid(planes: torch.Tensor, n: int) -> torch.Tensor:
    """Channel-major [B, C, h, w] -> tokens [B, n, C] (dropping the padding)."""
    b, c = planes.shape[:2]
    return planes.reshape(b, c, -1)[:, :, :n].transpose(1, 2)
