"""ALPS loss: soft-target cross-entropy against the adversarial label of the very forward being trained."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .labels import adversarial_label

__all__ = ['ALPSSoftTargetCrossEntropy']


class ALPSSoftTargetCrossEntropy(nn.Module):
    """Drop-in for timm's `SoftTargetCrossEntropy` that trains on the ALPS adversarial label.

    The least likely class k* is read from the detached logits of the forward being trained, so ALPS costs no
    extra forward pass (the "fused" path). Pair it with `ALPSMixup(model=None)`, which returns the plain
    (optionally smoothed) label of each sample. When `ALPSMixup` was given a model, its targets are already
    adversarial: use `mixup_fn.make_loss()`, which returns this loss with eps=0 so the label is not shifted twice.

    Args:
        eps: L1 radius of the label ball in [0, 2]; the paper uses (0, 0.5). eps=0 is exactly
            `SoftTargetCrossEntropy`.
    """

    def __init__(self, eps: float = 0.3):
        super().__init__()
        if not 0.0 <= float(eps) <= 2.0:
            raise ValueError(f'eps={eps} is outside [0, 2]: it is an L1 radius between label distributions')
        self.eps = float(eps)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of -sum_k rho_k log softmax(x)_k.

        Args:
            x: (B, K) logits.
            target: class indices (B,) or label distributions (B, K).
        """
        if self.eps > 0:
            target = adversarial_label(x, target, self.eps)
        elif target.ndim == 1:
            target = F.one_hot(target, x.shape[-1]).to(x.dtype)
        loss = torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1)
        return loss.mean()

    def extra_repr(self) -> str:
        return f'eps={self.eps}'
