"""ALPS as a `timm.task` training task, the method presets of the paper, and a sync-free loss monitor.

`ALPSTask` is timm's `ClassificationTask` with a batch transform in front of the forward: `ALPSMixup` (or timm's
`Mixup` for the MixUp baseline). With ``ALPSMixup(model=None)`` and `ALPSSoftTargetCrossEntropy` (the default,
"fused" labelling) the adversarial label comes from the logits of the forward being trained, at no extra cost and
with nothing special under DDP. With ``--alps-label model`` the mixer runs one extra no-grad forward on the module
*inside* the DDP wrapper, so it registers no gradient hooks and broadcasts no buffers.
"""
import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.task import ClassificationTask

from .loss import ALPSSoftTargetCrossEntropy
from .mixup import ALPSMixup

__all__ = ['ALPSTask', 'METHODS', 'METHOD_PRESETS', 'apply_method_preset', 'create_mixup_and_loss', 'LossMonitor']

_logger = logging.getLogger(__name__)

METHODS = ('erm', 'dropout', 'ls', 'mixup', 'alps')

# Settings of the paper's comparison (Guo et al., 2021, Sec. 5): values used when the flag is not given.
METHOD_PRESETS: Dict[str, Dict[str, Any]] = {
    'erm': dict(drop=0.0, smoothing=0.0),
    'dropout': dict(drop=0.5, smoothing=0.0),
    'ls': dict(drop=0.0, smoothing=0.1),
    'mixup': dict(drop=0.0, smoothing=0.0, mixup=1.0),
    'alps': dict(drop=0.0, smoothing=0.0, alps_eps=0.3, alps_beta=(8.0, 2.0)),
}
_ALPS_FLAGS = ('alps_eps', 'alps_beta', 'alps_prob', 'alps_mode', 'alps_label')


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def apply_method_preset(args) -> None:
    """Resolve ``args.method`` and fill flags left at None with the method's preset, validating combinations.

    Without ``--method`` the method is ALPS, unless only MixUp/CutMix flags are given (then it is timm's MixUp),
    so timm users' ``--mixup 0.2`` keeps its meaning. ALPS flags with another method, or together with
    ``--mixup``/``--cutmix``, are an error rather than silently ignored.

    Raises:
        ValueError: conflicting or out-of-range settings; the message names the flag.
    """
    alps_given = [f for f in _ALPS_FLAGS if getattr(args, f, None) is not None]
    # 0 disables MixUp/CutMix (as in timm), so `--mixup 0` or a saved args.yaml with mixup: 0.0 is not a request.
    mixup_given = [f for f in ('mixup', 'cutmix') if getattr(args, f, None)]
    if args.method is None:
        args.method = 'mixup' if mixup_given and not alps_given else 'alps'
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r} is unknown; choose one of {', '.join(METHODS)}")
    if alps_given and mixup_given:
        raise ValueError(f"{', '.join(map(_flag, alps_given))} cannot be combined with "
                         f"{', '.join(map(_flag, mixup_given))}: ALPS replaces MixUp/CutMix. Drop one of them.")
    if alps_given and args.method != 'alps':
        raise ValueError(f"{', '.join(map(_flag, alps_given))} only apply to --method alps (got --method "
                         f"{args.method})")
    if mixup_given and args.method not in ('mixup',):
        raise ValueError(f"{', '.join(map(_flag, mixup_given))} only apply to --method mixup (got --method "
                         f"{args.method}); ALPS has its own --alps-beta")

    if args.method == 'mixup' and mixup_given:
        # `--cutmix 1` alone means CutMix only, not CutMix plus the preset's MixUp.
        for f in ('mixup', 'cutmix'):
            if getattr(args, f, None) is None:
                setattr(args, f, 0.0)
    for k, v in METHOD_PRESETS[args.method].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    defaults = dict(drop=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0)
    if args.method == 'alps':
        defaults.update(alps_prob=1.0, alps_mode='elem', alps_label='fused')
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)

    if args.method == 'alps':
        beta = list(args.alps_beta)
        if len(beta) != 2:
            raise ValueError(f'--alps-beta takes two numbers, the alpha and beta of Beta(alpha, beta) '
                             f'(e.g. --alps-beta 8 2), got {len(beta)}: {beta}')
        if not all(b > 0 for b in beta):
            raise ValueError(f'--alps-beta {beta[0]} {beta[1]}: both parameters of Beta(alpha, beta) must be > 0')
        args.alps_beta = [float(b) for b in beta]
        if not 0.0 <= args.alps_eps <= 2.0:
            raise ValueError(f'--alps-eps {args.alps_eps} is outside [0, 2] (an L1 radius between label '
                             f'distributions; the paper uses values in (0, 0.5))')
        if not 0.0 <= args.alps_prob <= 1.0:
            raise ValueError(f'--alps-prob {args.alps_prob} is outside [0, 1]')
        if args.alps_label not in ('fused', 'model'):
            raise ValueError(f"--alps-label {args.alps_label!r} is unknown; use 'fused' or 'model'")
    if args.method == 'mixup':
        if args.mixup < 0 or args.cutmix < 0:
            raise ValueError(f'--mixup {args.mixup} / --cutmix {args.cutmix}: alphas must be >= 0 (0 disables)')
        if args.mixup == 0 and args.cutmix == 0:
            raise ValueError('--method mixup needs --mixup ALPHA > 0 or --cutmix ALPHA > 0')
    if not 0.0 <= args.smoothing < 1.0:
        raise ValueError(f'--smoothing {args.smoothing} is outside [0, 1)')
    if not 0.0 <= args.drop < 1.0:
        raise ValueError(f'--drop {args.drop} is outside [0, 1)')


def create_mixup_and_loss(
        args,
        num_classes: int,
        seed: Optional[int] = None,
) -> Tuple[Optional[Callable], nn.Module]:
    """Batch transform and training criterion for the resolved ``args.method``.

    Args:
        args: namespace after `apply_method_preset` (method, smoothing, mixup*, alps_*).
        num_classes: number of classes of the targets.
        seed: seed of ALPSMixup's private generator; pass a different one per DDP rank so ranks draw their own
            lam and partners.

    Returns:
        (mixup_fn or None, criterion)
    """
    if args.method == 'alps':
        alpha, beta = args.alps_beta
        mixup_fn = ALPSMixup(
            alps_alpha=alpha, alps_beta=beta, alps_eps=args.alps_eps, prob=args.alps_prob, mode=args.alps_mode,
            label_smoothing=args.smoothing, num_classes=num_classes, seed=seed)
        # The model handle is attached by ALPSTask (after DDP wrapping); make_loss() then returns eps=0.
        criterion = ALPSSoftTargetCrossEntropy(eps=0.0 if args.alps_label == 'model' else args.alps_eps)
        return mixup_fn, criterion
    if args.method == 'mixup':
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=getattr(args, 'cutmix_minmax', None),
            prob=getattr(args, 'mixup_prob', 1.0), switch_prob=getattr(args, 'mixup_switch_prob', 0.5),
            mode=getattr(args, 'mixup_mode', 'batch'), label_smoothing=args.smoothing, num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


class ALPSTask(ClassificationTask):
    """Classification task whose batches go through a mixer (ALPSMixup, timm Mixup) before the forward.

    Args:
        model: the model to train.
        mixup_fn: ``x, target = mixup_fn(x, target)`` applied to every training batch, or None.
        criterion: the training loss (e.g. `ALPSSoftTargetCrossEntropy`); see `create_mixup_and_loss`.
        label_from_model: ALPS model-handle path: give the mixer the (unwrapped) trainable module for its extra
            label forward. The criterion must then not shift the label again (eps=0).
        device, dtype, verbose: as for `timm.task.ClassificationTask`.

    Example:
        ```python
        mixup_fn, criterion = create_mixup_and_loss(args, num_classes=10, seed=args.seed + rank)
        task = ALPSTask(model, mixup_fn, criterion, device=device)
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
            label_from_model: bool = False,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        if label_from_model:
            if not isinstance(mixup_fn, ALPSMixup):
                raise ValueError('label_from_model=True needs an ALPSMixup as mixup_fn')
            if getattr(criterion, 'eps', 0.0) != 0.0:
                raise ValueError('label_from_model=True: the mixer already returns adversarial labels, so the '
                                 'criterion must not shift them again (use ALPSSoftTargetCrossEntropy(eps=0))')
        super().__init__(model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
        self.mixup_fn = mixup_fn
        self.label_from_model = label_from_model
        self._attach_label_model()

    def _attach_label_model(self) -> None:
        if self.label_from_model:
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


class LossMonitor:
    """Running training loss and count of non-finite losses, accumulated on the loss's device.

    `update` only queues device ops (no host sync per step); `check` and `summary` read back, so call
    them at log intervals / epoch end. Non-finite losses are left out of the mean.

    Args:
        device: device of the losses.
    """

    def __init__(self, device: Union[str, torch.device] = 'cpu'):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sample_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, n: int, step: int) -> None:
        """Record the loss of one update of `n` samples at global `step`."""
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss * n, 0.0)
        self.sample_count += finite.double() * n
        self.nonfinite += (~finite).long()
        first = (~finite) & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step = torch.where(first, step, self.first_nonfinite_step)

    def check(self, signal: int = 0, distributed: bool = False) -> Tuple[int, int, int]:
        """One read-back (and one small all-reduce under DDP) of the state every rank must agree on.

        Args:
            signal: a stop-signal number seen by this process (0 if none), shared so all ranks stop together.
            distributed: combine over the default process group.

        Returns:
            (largest signal number, non-finite losses so far (largest count over ranks), first global step with a
            non-finite loss or -1).
        """
        none = 2 ** 62
        first = torch.where(self.first_nonfinite_step < 0, none, self.first_nonfinite_step)
        flags = torch.stack([torch.full_like(self.nonfinite, signal), self.nonfinite, -first])
        if distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        sig, count, neg_first = flags.tolist()
        return int(sig), int(count), (-1 if -neg_first == none else int(-neg_first))

    def summary(self, distributed: bool = False) -> float:
        """Mean finite loss per sample (over all ranks if distributed); NaN when there was none."""
        totals = torch.stack([self.loss_sum, self.sample_count])
        if distributed:
            torch.distributed.all_reduce(totals)
        loss_sum, count = totals.tolist()
        return loss_sum / count if count else float('nan')
