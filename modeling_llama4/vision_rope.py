"""2D rotary position embedding of the vision encoder.

Each head's channels form `head_dim / 2` interleaved (real, imaginary) pairs. The first half of the
pairs rotates with the patch's column, the second half with its row, both 1-based, at frequencies
`theta ** (-2k / (head_dim / 2))` for k = 0 .. head_dim / 4 - 1. The class token, which sits after
the patches, is not rotated (angle 0).
"""

import torch


def vision_rotary_angles(grid_size: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Rotation angles (grid_size**2 + 1, head_dim // 2), patches in row-major order then the class token."""
    pairs = head_dim // 2
    frequencies = theta ** (-torch.arange(0, pairs, 2, dtype=torch.float32, device=device) / pairs)
    index = torch.arange(grid_size * grid_size, device=device)
    column = (index % grid_size + 1).float()
    row = (index // grid_size + 1).float()
    angles = torch.cat([column[:, None] * frequencies, row[:, None] * frequencies], dim=-1)
    return torch.cat([angles, angles.new_zeros(1, pairs)], dim=0)


def apply_vision_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x (..., T, heads, head_dim) by unit complex numbers (T, head_dim // 2).

    Runs in fp32 (as complex64) and returns x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[:, None, :]).flatten(-2).to(x.dtype)
