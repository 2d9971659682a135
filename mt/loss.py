"""Label-smoothed cross-entropy, as in fairseq (Szegedy et al. 2016; Vaswani et al. 2017).

Shape legend: B batch, T target length, V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_nll(
    logits: Tensor, target: Tensor, epsilon: float, pad_id: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed label-smoothed loss, summed NLL and non-pad token count over the target tokens.

    logits (B, T, V) of any float dtype, target (B, T) long. Returns (loss_sum, nll_sum, n_tokens):
    loss_sum and nll_sum are float32 scalars summed over non-pad targets, and n_tokens is a 0-dim
    int64 tensor on the logits' device (a tensor, not an int, so no device sync is forced and it
    can be all-reduced directly). Smoothing spreads epsilon uniformly over all V classes:
    loss = (1 - eps) * nll + eps * mean_v(-log p_v). With eps=0, loss_sum == nll_sum.
    """
    # Softmax in float32: bf16/fp16 log-probabilities are too coarse to sum over many tokens.
    lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (B, T, V)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    # Sum over V, then scale one scalar by 1/V: a mean's backward would divide all B*T*V entries.
    smooth = -lprobs.sum(dim=-1)  # (B, T)
    keep = target != pad_id  # (B, T)
    nll_sum = nll.masked_fill(~keep, 0.0).sum()
    smooth_sum = smooth.masked_fill(~keep, 0.0).sum()
    loss_sum = (1.0 - epsilon) * nll_sum + (epsilon / lprobs.size(-1)) * smooth_sum
    return loss_sum, nll_sum, keep.sum()
