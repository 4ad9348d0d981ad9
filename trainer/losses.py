"""Eq. 1 of the paper: projection (MSE) loss + λ · InfoNCE between predicted image and pooled text embeddings.

Choice of similarity and temperature (the paper says "inner product / τ" and gives no τ; the official
ECLIPSE / λ-ECLIPSE training code is not public — eclipse-t2i/eclipse-inference#2 and
eclipse-t2i/lambda-eclipse-inference#2 — so it cannot be copied). Default: cosine similarity
(inner product of L2-normalised vectors, the CLIP convention: raw bigG embeddings have norms in the
tens, so an unnormalised inner product over τ saturates the softmax) with a fixed τ = 0.07 (CLIP's
initial temperature). Both are settings: `similarity="dot"` gives the literal un-normalised inner
product, `temperature` any τ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_logits(pred: torch.Tensor, text: torch.Tensor, similarity: str, temperature: float) -> torch.Tensor:
    if similarity == "cosine":
        pred, text = F.normalize(pred, dim=-1), F.normalize(text, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', not {similarity!r}")
    return pred @ text.t() / temperature


def prior_loss(pred, target, text_global, row_offset: int, lam: float = 0.2, temperature: float = 0.07,
               similarity: str = "cosine", mse_reduction: str = "sum") -> dict[str, torch.Tensor]:
    """Rows = this process's predictions; columns = pooled text of the whole global batch.

    Eq. 1 is one-directional (softmax over texts j for each prediction i). Using the global batch for
    the columns makes the loss (and its gradient, after DDP's average) the same for any process count.
    `mse_reduction`: "mean" over all elements (diffusers' prior-training convention) or "sum" over the
    embedding then mean over the batch (the literal ‖·‖²₂ of Eq. 1).
    """
    pred = pred.float()
    target = target.float()
    if mse_reduction == "mean":
        mse = F.mse_loss(pred, target)
    elif mse_reduction == "sum":
        mse = (pred - target).pow(2).sum(-1).mean()
    else:
        raise ValueError(f"mse_reduction must be 'mean' or 'sum', not {mse_reduction!r}")
    labels = torch.arange(pred.shape[0], device=pred.device) + row_offset
    logits = similarity_logits(pred, text_global.float().to(pred.device), similarity, temperature)
    contrastive = F.cross_entropy(logits, labels)
    return {"loss": mse + lam * contrastive, "mse": mse, "contrastive": contrastive}


@torch.no_grad()
def retrieval_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Cosine to target; top-1/top-5: is the target among the k most similar targets of the batch."""
    p, t = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    cos = (p * t).sum(-1)
    sims = p @ t.t()
    rank = (sims > cos[:, None]).sum(-1)  # targets strictly more similar than the right one
    return {"cosine": cos.mean().item(), "top1": (rank < 1).float().mean().item(),
            "top5": (rank < 5).float().mean().item()}
