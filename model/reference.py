"""Reference-view selection: score candidate views by the network's confidence."""

from __future__ import annotations

import torch

from .network import CryoFastAR

__all__ = ["select_reference"]


@torch.no_grad()
def select_reference(model: CryoFastAR, candidates: torch.Tensor, context: int = 15,
                     sets_per_pass: int = 8) -> tuple[int, torch.Tensor]:
    """Pick the candidate that, as reference, gives the most confident FPMs.

    Each candidate ``k`` is made the reference of a set whose other views are
    ``context`` other candidates; its score is the mean log-confidence over all
    samples of all views of that set. A corrupt, empty or ice-only particle gives no
    consistent frame, so its sets come out with low confidence.

    Parameters
    ----------
    model: CryoFastAR
        The network (eval mode).
    candidates: torch.Tensor
        `(K, b, b)` images at the model box, K >= 2 (the paper uses K = 64).
    context: int
        Other views per scoring set (fewer if K is smaller).
    sets_per_pass: int
        Scoring sets per forward pass (memory bound).

    Returns
    -------
    index: int
        Index of the best candidate.
    scores: torch.Tensor
        `(K,)` float32 scores.
    """
    k = candidates.shape[0]
    if k < 2:
        raise ValueError("reference selection needs at least 2 candidate views")
    n_ctx = min(context, k - 1)
    rows = torch.arange(k)[:, None]
    others = (rows + 1 + torch.arange(n_ctx)[None, :]) % k  # never the candidate itself
    index = torch.cat([rows, others], 1)  # (K, 1 + n_ctx)
    device = next(model.parameters()).device
    scores = []
    for first in range(0, k, sets_per_pass):
        sets = candidates[index[first : first + sets_per_pass]].to(device)
        _, confidence = model(sets)
        scores.append(confidence.float().log().mean(dim=(1, 2, 3)).cpu())
    all_scores = torch.cat(scores)
    return int(all_scores.argmax()), all_scores
