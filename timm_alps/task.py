"""ALPS as a `timm.task` training task.

`ALPSTask` is timm's `ClassificationTask` with a batch transform in front of the forward: `ALPSMixup` (or timm's
`Mixup` for the MixUp baseline). The mixer owns the ALPS label path (`mixup_fn.label_path`) and the criterion comes
from it (`mixup_fn.make_loss()`). With the default "fused" path the adversarial label comes from the logits of the
forward being trained, at no extra cost and with nothing special under DDP. On the "model" path the mixer runs one
extra no-grad forward; the task hands it the module *inside* the DDP wrapper (after `prepare_distributed` or
`compile`), so that forward registers no gradient hooks and broadcasts no buffers.
"""
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from timm.task import ClassificationTask

__all__ = ['ALPSTask']


def _label_path(mixup_fn) -> Optional[str]:
    # ALPS mixers say which path they take; timm's Mixup (or None) has no label path.
    return getattr(mixup_fn, 'label_path', None)


class ALPSTask(ClassificationTask):
    """Classification task whose batches go through a mixer (ALPSMixup, timm Mixup) before the forward.

    Args:
        model: the model to train.
        mixup_fn: ``x, target = mixup_fn(x, target)`` applied to every training batch, or None.
        criterion: the training loss; for ALPS the one the mixer makes (``mixup_fn.make_loss()``), which knows
            whether the targets are already adversarial.
        device, dtype, verbose: as for `timm.task.ClassificationTask`.

    Example:
        ```python
        mixup_fn = ALPSMixup(num_classes=10, seed=seed + rank)  # ALPSMixup(..., model=model): model label path
        task = ALPSTask(model, mixup_fn, mixup_fn.make_loss(), device=device)
        task.prepare_distributed(device_ids=[local_rank])  # DDP, if distributed
        result = task(images, labels)
        result['loss'].backward()
        ```
    """

    def __init__(
            self,
            model: nn.Module,
            mixup_fn: Optional[Callable] = None,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
        self.mixup_fn = mixup_fn
        self._attach_label_model()

    def _attach_label_model(self) -> None:
        # The mixer decided the label path; here it only gets the module that now trains (compiled, not DDP).
        if _label_path(self.mixup_fn) == 'model':
            module = self.trainable_module
            # Under DDP the label forward must bypass the wrapper: no reducer hooks, no buffer broadcast.
            if isinstance(module, nn.parallel.DistributedDataParallel):
                module = module.module
            self.mixup_fn.set_model(module)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'ALPSTask':
        super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)
        self._attach_label_model()
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        out = super().compile(backend=backend, mode=mode, **compile_kwargs)
        self._attach_label_model()
        return out

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Mix the batch, forward the model, and compute the training loss.

        Returns:
            dict with 'loss' (scalar) and 'output' (logits of the mixed batch).
        """
        if self.mixup_fn is not None:
            input, target = self.mixup_fn(input, target)
        output = self.trainable_module(input)
        if output.device.type == 'cpu' and not bool(torch.isfinite(output).all()):
            # Free on CPU; the ALPS label would raise on NaN logits, but a diverged run is a loss problem: report
            # it through the loss so the training loop's non-finite policy (stop or skip) applies.
            loss = output.sum() * float('nan')
        else:
            loss = self.criterion(output, target)
        return {'loss': loss, 'output': output}
