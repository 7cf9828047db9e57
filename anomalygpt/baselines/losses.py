"""Reconstruction losses of the pixel autoencoder baseline: SSIM (Wang et al. 2004) and L1 + (1 - SSIM).

SSIM follows skimage's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`:
Gaussian-weighted local statistics over an 11 x 11 window, K1 = 0.01, K2 = 0.03, and the mean taken where the
window fits inside the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 x 11 window: skimage's truncate=3.5 at sigma 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> torch.Tensor:
    """(2 * radius + 1,) normalised 1-D Gaussian."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def gaussian_blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of (B, C, H, W): each side shrinks by len(window) - 1."""
    channels = x.shape[1]
    size = window.numel()
    rows = window.view(1, 1, 1, size).expand(channels, 1, 1, size)
    cols = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)


def local_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, same_size: bool = False) -> torch.Tensor:
    """Per-pixel SSIM of two (B, C, H, W) images: (B, C, H - 10, W - 10), or (B, C, H, W) with `same_size`
    (borders reflect-padded, for anomaly maps)."""
    if same_size:
        pad = (SSIM_RADIUS,) * 4
        x, y = F.pad(x, pad, mode="reflect"), F.pad(y, pad, mode="reflect")
    window = gaussian_window().to(x.device, x.dtype)
    mu_x, mu_y = gaussian_blur(x, window), gaussian_blur(y, window)
    var_x = gaussian_blur(x * x, window) - mu_x**2
    var_y = gaussian_blur(y * y, window) - mu_y**2
    cov = gaussian_blur(x * y, window) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of two (B, C, H, W) images over batch, channels and the pixels the window fits around."""
    return local_ssim(x, y, data_range).mean()


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0, ssim_weight: float = 1.0
) -> torch.Tensor:
    """l1_weight * mean |r - t| + ssim_weight * (1 - SSIM(r, t)) of (B, C, H, W) images in [0, 1]."""
    l1 = (reconstruction - target).abs().mean()
    return l1_weight * l1 + ssim_weight * (1.0 - ssim(reconstruction, target))
