"""Training loss and the training-time pose error.

Loss (the paper's, made hand-invariant): for every sample of every view,

    C · |X_pred − X_true| − alpha · log C

averaged over samples and views of a set; a set's loss is the smaller of the loss
against the true FPM and against its mirror image (:func:`mirror_fpm`), because a
molecule and its mirror give the same images. A whole set is mirrored, never single views.
"""

from __future__ import annotations

import torch

from .fpm import mirror_fpm

__all__ = ["fpm_loss"]


def fpm_loss(fpm: torch.Tensor, confidence: torch.Tensor, target: torch.Tensor,
             alpha: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-invariant confidence-weighted FPM loss.

    Parameters
    ----------
    fpm, target: torch.Tensor
        `(S, V, L, R, 3)` predicted and true FPM.
    confidence: torch.Tensor
        `(S, V, L, R)` predicted confidence (> 1).
    alpha: float
        Weight of the ``-log C`` term.

    Returns
    -------
    loss: torch.Tensor
        Scalar, mean over sets.
    mirrored: torch.Tensor
        `(S,)` bool, True where the mirrored target was the closer one.
    """
    dims = tuple(range(1, fpm.dim() - 1))
    fpm, confidence = fpm.float(), confidence.float()
    direct = (fpm - target).norm(dim=-1)
    flipped = (fpm - mirror_fpm(target)).norm(dim=-1)
    log_c = confidence.log()
    per_set = torch.stack([(confidence * direct - alpha * log_c).mean(dims),
                           (confidence * flipped - alpha * log_c).mean(dims)], -1)
    best, mirrored = per_set.min(-1)
    return best.mean(), mirrored.bool()
