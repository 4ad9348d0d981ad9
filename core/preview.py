"""Cheap previews while decoding: the predicted clean latent, shrunk, through the MoVQ.

Kandinsky's MoVQ latents have no published linear latent→RGB factors, so the preview is the real MoVQ on a
latent shrunk to at most `max_side` cells a side (32 → a 256 px picture): about (32/64)² = 1/4 of a full
512 px MoVQ decode, and far less for larger images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def preview_image(decoder, latents: torch.Tensor, max_side: int = 32):
    """The first image of a latent batch [B,C,h,w] as a small PIL picture."""
    from PIL import Image

    latent = latents[:1].detach()
    h, w = latent.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        latent = F.interpolate(latent.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                               mode="bilinear", align_corners=False)
    movq = decoder.movq
    param = next(movq.parameters())
    image = movq.decode(latent.to(param.device, param.dtype), force_not_quantize=True).sample
    image = (image.float() * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
    if not torch.isfinite(image).all():
        return None
    return Image.fromarray((image.cpu().numpy() * 255 + 0.5).astype("uint8"), "RGB")
