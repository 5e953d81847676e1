"""HEVC frame packing: uint8 channel tiles <-> planes of 8-bit YUV444 frames, shared by every backend.

Each (batch, channel) pair is one ``h x w`` tile (the image-token grid).  A plane holds
``tile_dim x tile_dim`` tiles, a frame three planes (Y, U, V), so a frame carries
``3 * tile_dim**2`` channels.  Planes are padded to a multiple of 16 and to at least 144 pixels
(the smallest frame every NVENC accepts).  ``planes_to_tiles`` is the one parsing path from
decoded frames back to tiles: the x265/PyAV decoder and NVDEC both feed it.
"""

from __future__ import annotations

import math

import torch

from mesh_ray.codec.errors import CodecError

MIN_PLANE = 144
ALIGN = 16
MAX_AUTO_PLANE = 2048  # auto tile_dim keeps frames at or below 2048x2048 (every NVENC handles it)


def plane_size(n: int) -> int:
    """Padded plane side for ``n`` pixels of content."""
    return max(MIN_PLANE, -(-n // ALIGN) * ALIGN)


def auto_tile_dim(tiles: int, grid: tuple[int, int]) -> int:
    """Tiles per plane side: one frame for all tiles if it fits in MAX_AUTO_PLANE, else as many as fit."""
    fit = max(1, MAX_AUTO_PLANE // max(grid))
    return max(1, min(math.isqrt(max(0, -(-tiles // 3) - 1)) + 1, fit))


def frame_shape(tile_dim: int, grid: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of every frame."""
    return plane_size(tile_dim * grid[0]), plane_size(tile_dim * grid[1])


def frame_count(tiles: int, tile_dim: int) -> int:
    return -(-tiles // (3 * tile_dim * tile_dim))


def tiles_to_planes(tiles: torch.Tensor, tile_dim: int) -> torch.Tensor:
    """uint8 tiles [n, h, w] -> frames [F, 3, H, W] (missing tiles and padding are 0)."""
    n, h, w = tiles.shape
    td = tile_dim
    per_frame = 3 * td * td
    frames = frame_count(n, td)
    if frames * per_frame > n:
        tiles = torch.cat((tiles, tiles.new_zeros(frames * per_frame - n, h, w)))
    mosaic = tiles.reshape(frames, 3, td, td, h, w).permute(0, 1, 2, 4, 3, 5).reshape(frames, 3, td * h, td * w)
    big_h, big_w = frame_shape(td, (h, w))
    out = tiles.new_zeros(frames, 3, big_h, big_w)
    out[:, :, : td * h, : td * w] = mosaic
    return out.contiguous()


def planes_to_tiles(frames: torch.Tensor, tiles: int, tile_dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Decoded frames [F, 3, H, W] uint8 (CPU or CUDA) -> tiles [tiles, h, w]; the shared parsing path."""
    h, w = grid
    td = tile_dim
    want = (frame_count(tiles, td), 3, *frame_shape(td, grid))
    if tuple(frames.shape) != want:
        raise CodecError(f"decoded frames have shape {tuple(frames.shape)}, expected {want}: "
                         "the HEVC stream is corrupt or from another encoder; resend it")
    mosaic = frames[:, :, : td * h, : td * w].reshape(want[0], 3, td, h, td, w).permute(0, 1, 2, 4, 3, 5)
    return mosaic.reshape(-1, h, w)[:tiles]
