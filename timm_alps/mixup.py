"""ALPSMixup: the input side of ALPS, shaped like `timm.data.Mixup`.

ALPS perturbs each sample towards a random partner, x~ = lam * x + (1 - lam) * x', with lam ~ Beta(alpha, beta)
whose mode is near 1, and keeps the sample's *own* label, which is then moved adversarially inside an L1 ball
(see `timm_alps.labels`). Swap `Mixup` for `ALPSMixup` (or `FastCollateMixup` for `FastCollateALPSMixup`) and build
the loss with `mixup_fn.make_loss()` (or `make_loss('bce', ...)` for timm's `--bce-loss`).

Note on defaults: timm's `Mixup` defaults to `label_smoothing=0.1`; `ALPSMixup` defaults to 0 (the paper's
recipe). `from_mixup_args` takes the value in timm's `mixup_args` dict (train.py's `--smoothing`, default 0.1).
"""
import inspect
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import get_worker_info

from ._validate import choice_arg, eps_arg, int_arg, real_arg
from .labels import label_from_checked, validate_target
from .loss import ALPSBinaryCrossEntropy, ALPSLoss, ALPSSoftTargetCrossEntropy, mark_adversarial

__all__ = ['ALPSMixup', 'sample_mixing']

_MODES = ('elem', 'pair', 'batch')

# Keys of timm's `mixup_args` (train.py) that have no meaning for ALPS, with the values that mean "not set":
# train.py's own defaults (--mixup 0, --cutmix 0) and `timm.data.Mixup`'s constructor defaults.
_NO_ALPS_MEANING = {
    'mixup_alpha': (0.0, 1.0),
    'cutmix_alpha': (0.0,),
    'cutmix_minmax': (None,),
    'switch_prob': (0.5,),
    'correct_lam': (True,),
    'multi_label': (False,),
}
_MIXUP_ARGS_FOR_ALPS = ('prob', 'mode', 'label_smoothing', 'num_classes')


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's forward would register gradient-sync hooks and broadcast buffers; the label forward must do neither.
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _beta(alpha: float, beta: float, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Beta(a, b) = Ga / (Ga + Gb); torch.distributions cannot take a generator, _standard_gamma can.
    ga = torch._standard_gamma(torch.full((n,), alpha, device=device), generator=generator)
    gb = torch._standard_gamma(torch.full((n,), beta, device=device), generator=generator)
    return ga / (ga + gb)


def sample_mixing(
        batch_size: int,
        alpha: float,
        beta: float,
        prob: float,
        mode: str,
        generator: torch.Generator,
        device: Union[str, torch.device] = 'cpu',
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ALPS mixing parameters for a batch (the one sampler of `ALPSMixup` and `FastCollateALPSMixup`).

    Args:
        batch_size: B.
        alpha, beta: parameters of the Beta distribution of lam, the weight of the sample itself.
        prob: probability that a sample ('elem'), pair ('pair') or the batch ('batch') is mixed at all.
        mode: 'elem' draws lam per sample, 'pair' per pair of partners (each mixes with the other), 'batch' once.
        generator: the private generator to draw from (on `device`).
        device: where to draw.

    Returns:
        (lam, partner): lam (B,) float32 in [0, 1], 1 where not mixed; partner (B,) int64 indices, a permutation.
    """
    g, device = generator, torch.device(device)
    if mode == 'pair':
        # Pair up a random permutation; an odd batch leaves one sample paired with itself (unmixed).
        perm = torch.randperm(batch_size, generator=g, device=device)
        n = batch_size // 2
        first, second = perm[:n], perm[n:2 * n]
        partner = torch.arange(batch_size, device=device)
        partner[first], partner[second] = second, first
        keep = torch.rand(n, generator=g, device=device) < prob
        lam_pair = torch.where(keep, _beta(alpha, beta, n, g, device), 1.0)
        lam = torch.ones(batch_size, device=device)
        lam[first], lam[second] = lam_pair, lam_pair
        return lam, partner
    partner = torch.randperm(batch_size, generator=g, device=device)
    n = batch_size if mode == 'elem' else 1
    keep = torch.rand(n, generator=g, device=device) < prob
    lam = torch.where(keep, _beta(alpha, beta, n, g, device), 1.0)
    return lam.expand(batch_size), partner


class _ALPSMixingBase:
    """Arguments, random streams and labels shared by `ALPSMixup` and `FastCollateALPSMixup`."""

    def __init__(
            self,
            alps_alpha: float = 8.0,
            alps_beta: float = 2.0,
            alps_eps: float = 0.3,
            prob: float = 1.0,
            mode: str = 'elem',
            label_smoothing: float = 0.0,
            num_classes: int = 1000,
            seed: Optional[int] = None,
            rank: Optional[int] = None,
    ):
        # Every argument is validated here, where the user's value enters; the rest of the code trusts them.
        self.alps_alpha = real_arg('alps_alpha', alps_alpha, 0.0, float('inf'), low_open=True, high_open=True)
        self.alps_beta = real_arg('alps_beta', alps_beta, 0.0, float('inf'), low_open=True, high_open=True)
        # The losses make_loss() built for the fused path: they apply the label, so they own the radius, and
        # `alps_eps` sets theirs. Plain references: a deepcopy or pickle of mixer and loss together keeps the link.
        self._fused_losses: List[nn.Module] = []
        self.alps_eps = alps_eps  # validated by the property
        self.prob = real_arg('prob', prob, 0.0, 1.0)
        self.mode = choice_arg('mode', mode, _MODES)
        self.label_smoothing = real_arg('label_smoothing', label_smoothing, 0.0, 1.0, high_open=True)
        self.num_classes = int_arg('num_classes', num_classes, 2)
        self.seed = None if seed is None else int_arg('seed', seed, 0, 2 ** 64)
        self.rank = None if rank is None else int_arg('rank', rank, 0)
        self.mixup_enabled = True  # as in timm: set False to stop mixing inputs (the label ball stays)
        self.epoch = 0
        self._generator: Optional[torch.Generator] = None
        self._stream_key: Optional[tuple] = None
        self._pending_state: Optional[Tuple[torch.Tensor, str]] = None  # (generator state, device type)

    @classmethod
    def from_mixup_args(cls, mixup_args: Mapping[str, Any], **alps_kwargs):
        """Build from timm train.py's ``mixup_args`` dict (the kwargs it passes to `Mixup`/`FastCollateMixup`).

        `prob`, `mode`, `label_smoothing` and `num_classes` are taken over, as are this class's own arguments
        (`alps_eps`, `seed`, ...) if the dict holds them; keyword arguments given here win.
        `mixup_alpha`, `cutmix_alpha`, `cutmix_minmax`, `switch_prob`, `correct_lam` and `multi_label` have no ALPS
        meaning and must be at their defaults (ALPS draws lam from Beta(alps_alpha, alps_beta), never cuts boxes).
        Keys absent from the dict keep this class's defaults (label_smoothing 0, where timm's `Mixup` has 0.1).
        Note that timm's train.py defaults to ``--mixup-mode batch`` (one lam per batch); the paper draws one lam
        per sample: pass ``--mixup-mode elem`` or ``mode='elem'``.

        Example:
            mixup_fn = ALPSMixup.from_mixup_args(mixup_args, alps_eps=0.3)
        """
        if not isinstance(mixup_args, Mapping):
            raise TypeError(f'mixup_args must be a dict (timm train.py\'s mixup_args), got {type(mixup_args).__name__}')
        kwargs = {}
        for key, value in mixup_args.items():
            if key in _NO_ALPS_MEANING:
                if not any(value is d or (d is not None and value == d) for d in _NO_ALPS_MEANING[key]):
                    defaults = ' or '.join(map(repr, _NO_ALPS_MEANING[key]))
                    raise ValueError(
                        f'mixup_args[{key!r}]={value!r} has no meaning for ALPS (ALPS mixes every sample with a '
                        f'random partner at lam ~ Beta(alps_alpha, alps_beta) and keeps its own label): leave it at '
                        f'its default ({defaults}) and set alps_alpha/alps_beta instead')
            elif key in _MIXUP_ARGS_FOR_ALPS or key in inspect.signature(cls).parameters:
                kwargs[key] = value  # timm's shared arguments, or this class's own (alps_eps, seed, ...)
            else:
                raise ValueError(f'mixup_args[{key!r}] is not an argument of timm\'s Mixup that ALPS knows; '
                                 f'known: {", ".join(sorted((*_MIXUP_ARGS_FOR_ALPS, *_NO_ALPS_MEANING)))}')
        kwargs.update(alps_kwargs)
        return cls(**kwargs)

    # -- the radius -----------------------------------------------------------------------------------------------
    @property
    def alps_eps(self) -> float:
        """L1 radius of the adversarial label ball in [0, 2], validated whenever it is set.

        It may change during training, e.g. ramped in from 0 over the first updates by `EpsWarmup` (the remedy for
        the ALPS start stall), or set by hand: ``mixup_fn.alps_eps = 0.3 * min(1, step / warmup_updates)``.
        Setting it reaches whichever part applies the label, so the label stays applied exactly once: on the fused
        path the losses this mixer made with `make_loss()` take the new eps (copies of mixer and loss made together,
        by `copy.deepcopy` or pickle, stay linked); on the model path this mixer applies it itself and its loss
        keeps eps 0. A value that any of them refuses changes none of them.
        """
        return self._alps_eps

    @alps_eps.setter
    def alps_eps(self, value) -> None:
        eps = eps_arg('alps_eps', value)
        for loss in self._fused_losses:
            loss._check_eps(eps)  # every constraint first, so a refused value changes nothing
        self._alps_eps = eps
        for loss in self._fused_losses:
            loss.eps = eps

    # -- the label path -----------------------------------------------------------------------------------------
    @property
    def label_path(self) -> str:
        """'fused' (the loss applies the adversarial label from the training forward) or 'model' (this mixer does)."""
        return 'fused'

    def make_loss(self, loss: Union[str, nn.Module] = 'ce', **loss_kwargs) -> nn.Module:
        """The criterion that matches this mixer, so the adversarial label is applied exactly once.

        Args:
            loss: 'ce' (`ALPSSoftTargetCrossEntropy`), 'bce' (`ALPSBinaryCrossEntropy`, timm's ``--bce-loss``) or
                any soft-target loss module (wrapped in `ALPSLoss`).
            **loss_kwargs: further arguments of the loss, e.g. ``target_threshold``, ``sum_classes`` and
                ``pos_weight`` for 'bce'. Not ``eps``: the mixer's ``alps_eps`` decides it.

        Returns:
            The loss with eps=alps_eps on the fused path (it then follows later changes of `alps_eps`), eps=0 when
            this mixer already made the targets adversarial (the model path).
        """
        if 'eps' in loss_kwargs:
            raise ValueError('make_loss() takes eps from the mixer (alps_eps); do not pass eps')
        fused = self.label_path == 'fused'
        eps = self.alps_eps if fused else 0.0
        if isinstance(loss, str):
            if loss == 'ce':
                criterion = ALPSSoftTargetCrossEntropy(eps=eps, **loss_kwargs)
            elif loss == 'bce':
                # targets from the mixer are already smoothed (B, K) rows, so BCE's own index smoothing is unused
                criterion = ALPSBinaryCrossEntropy(eps=eps, **loss_kwargs)
            else:
                raise ValueError(f"loss={loss!r} is unknown; use 'ce', 'bce' or a soft-target loss module")
        elif loss_kwargs:
            raise ValueError(f'loss_kwargs {sorted(loss_kwargs)} only apply to loss=\'ce\'/\'bce\'')
        else:
            criterion = ALPSLoss(loss, eps=eps)
        if fused:
            self._fused_losses.append(criterion)
        return criterion

    # -- random streams -----------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Tell the mixer the epoch, so streams started from now on differ from those of earlier epochs.

        A stream (one per process: the main process or each DataLoader worker) is derived when it first draws and
        then continues; the epoch enters the derivation. Call it before iterating the loader each epoch (as
        ``DistributedSampler.set_epoch``): a resumed run then does not replay the draws of epoch 0.
        """
        self.epoch = int_arg('epoch', epoch, 0)

    def _resolved_rank(self) -> int:
        if self.rank is not None:
            return self.rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def __getstate__(self) -> Dict[str, Any]:
        # Pickled into spawned DataLoader workers: fix the DDP rank now (the worker has no process group).
        state = self.__dict__.copy()
        state['rank'] = self._resolved_rank()
        return state

    def _rng(self, device: torch.device) -> torch.Generator:
        """The private generator of this process (and DataLoader worker), created on first use.

        Its seed is a hash (numpy's SeedSequence) of (seed, DDP rank, worker id, torch's seed of the worker, epoch
        when the stream started). torch derives a worker's seed from the loader's generator, i.e. from the global
        RNG (`torch.manual_seed`), anew each time workers start. With seed=None the first entry is drawn from the
        global RNG instead.
        """
        info = get_worker_info()
        key = (device, None if info is None else (info.id, info.seed))
        if self._generator is None or self._stream_key != key:
            generator = torch.Generator(device=device)
            if self._pending_state is not None and info is None:
                # a loaded state resumes the main process's stream; workers always derive their own
                state, saved_on = self._pending_state
                if saved_on != device.type:
                    raise ValueError(f'the loaded mixer state is a {saved_on} generator state but the batch is on '
                                     f'{device}: resume on the device the run was saved on')
                generator.set_state(state)
                self._pending_state = None
            else:
                base = self.seed if self.seed is not None else int(torch.randint(2 ** 62, (1,)).item())
                worker = (0, 0) if info is None else (info.id + 1, info.seed)
                entropy = [base, self._resolved_rank(), *worker, self.epoch]
                seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
                generator.manual_seed(seed)
            self._generator, self._stream_key = generator, key
        return self._generator

    def state_dict(self) -> Dict[str, Any]:
        """Generator state of this process, so a resumed run draws exactly the same lam and partners.

        ``{'generator': ByteTensor or None, 'device': 'cpu' / 'cuda' / ... or None}``; None before the first draw.
        """
        if self._generator is not None:
            return {'generator': self._generator.get_state(), 'device': self._generator.device.type}
        if self._pending_state is not None:
            return {'generator': self._pending_state[0], 'device': self._pending_state[1]}
        return {'generator': None, 'device': None}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Continue the stream saved by `state_dict()`; anything it cannot restore exactly is refused."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f'state_dict must be the dict from {type(self).__name__}.state_dict(), got '
                            f'{type(state_dict).__name__}')
        if set(state_dict) != {'generator', 'device'}:
            raise ValueError(f"state_dict has keys {sorted(state_dict)}; a mixer state has ['device', 'generator']")
        state, device = state_dict['generator'], state_dict['device']
        if state is None:
            if device is not None:
                raise ValueError(f"state_dict['device']={device!r} without a generator state")
            pending = None
        else:
            if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.ndim == 1):
                raise TypeError(f"state_dict['generator'] must be the uint8 tensor of Generator.get_state(), got "
                                f"{getattr(state, 'dtype', type(state).__name__)}")
            if not isinstance(device, str):
                raise TypeError(f"state_dict['device'] must be a device type such as 'cpu', got {device!r}")
            if device == 'cpu':
                try:  # a state of the wrong size or content is refused now, not at the first draw
                    torch.Generator().set_state(state)
                except RuntimeError as e:
                    raise ValueError(f"state_dict['generator'] is not a CPU generator state: {e}") from None
            pending = (state.clone(), torch.device(device).type)
        self._generator, self._stream_key, self._pending_state = None, None, pending

    def sample(self, batch_size: int, device: Union[str, torch.device] = 'cpu') -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw (lam, partner) for a batch: lam (B,) in [0, 1] (1 where not mixed), partner (B,) indices."""
        device = torch.device(device)
        return sample_mixing(batch_size, self.alps_alpha, self.alps_beta, self.prob, self.mode, self._rng(device),
                             device)

    # -- labels -------------------------------------------------------------------------------------------------
    def base_target(self, target: torch.Tensor, device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
        """The sample's own label as a (B, K) float32 distribution, smoothed as in timm's Mixup.

        Args:
            target: what `validate_target` returned: (B,) int64 class indices or (B, K) distributions.
            device: where to build it.
        """
        target = target.to(device)
        if target.ndim == 1:
            off = self.label_smoothing / self.num_classes
            soft = torch.full((target.shape[0], self.num_classes), off, device=device)
            return soft.scatter_(1, target.view(-1, 1), 1.0 - self.label_smoothing + off)
        soft = target.float()
        return soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes

    def _alps_repr(self) -> str:
        return (f'alps_alpha={self.alps_alpha}, alps_beta={self.alps_beta}, alps_eps={self.alps_eps}, '
                f'prob={self.prob}, mode={self.mode!r}, label_smoothing={self.label_smoothing}, '
                f'num_classes={self.num_classes}, seed={self.seed}')


class ALPSMixup(_ALPSMixingBase):
    """ALPS perturbation of a batch: mix every sample with a random partner, keep (and adversarially shift) its label.

    Args:
        alps_alpha: alpha of the Beta(alpha, beta) distribution of the mixing weight lam of the sample itself
            (finite, > 0).
        alps_beta: beta of that distribution; the paper puts the mode (alpha-1)/(alpha+beta-2) in (0.75, 1),
            e.g. Beta(8, 2) has mode 0.875.
        alps_eps: L1 radius of the adversarial label ball in [0, 2] (paper: (0, 0.5)); may be changed during
            training (see the `alps_eps` property).
        prob: probability that a sample (`elem`), pair (`pair`) or the batch (`batch`) is mixed at all. The
            adversarial label applies to every sample: in ALPS the label ball is independent of the input mix.
        mode: 'elem' draws lam per sample, 'pair' per pair of partners (each mixes with the other), 'batch' once.
        label_smoothing: smoothing of the base label before the adversarial shift, as in timm's Mixup (whose
            default is 0.1; ours is 0).
        num_classes: number of classes K of the targets (an integer >= 2; numpy/torch integers accepted).
        model: optional model handle. When given, k* comes from one extra forward of the mixed batch under
            `torch.no_grad()` (buffers such as BatchNorm statistics and the CPU/accelerator RNG state are restored
            afterwards, so the training forward draws the same dropout masks) and the returned target is already
            adversarial (and marked so: an ALPS loss with eps > 0 refuses it); pair it with `make_loss()`. The
            model's forward must return the (B, K) logits tensor. When None (recommended, zero extra cost), the
            target is the base label and the loss applies the shift from the training forward.
        seed: seed of the private generator for lam, partners and `prob`, an integer in [0, 2**64); None draws one
            from torch's global RNG on first use. Each process (DDP rank, DataLoader worker) derives its own stream
            from it, see `set_epoch`.
        rank: DDP rank mixed into the stream; default: torch.distributed's rank when initialised, else 0.
    """

    def __init__(
            self,
            alps_alpha: float = 8.0,
            alps_beta: float = 2.0,
            alps_eps: float = 0.3,
            prob: float = 1.0,
            mode: str = 'elem',
            label_smoothing: float = 0.0,
            num_classes: int = 1000,
            model: Optional[nn.Module] = None,
            seed: Optional[int] = None,
            rank: Optional[int] = None,
    ):
        super().__init__(alps_alpha, alps_beta, alps_eps, prob, mode, label_smoothing, num_classes, seed, rank)
        self.model = None
        self.set_model(model)

    def set_model(self, model: Optional[nn.Module]) -> None:
        """Switch to (model) or away from (None) the model-handle path, e.g. after wrapping the model in DDP."""
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f'model must be an nn.Module or None, got {type(model).__name__}')
        self.model = model

    @property
    def label_path(self) -> str:
        """'model' when a model handle is set (this mixer applies the label), else 'fused' (the loss does)."""
        return 'fused' if self.model is None else 'model'

    @torch.no_grad()
    def _label_logits(self, x: torch.Tensor) -> torch.Tensor:
        module = _unwrap(self.model)
        buffers = list(module.buffers())
        saved = [b.clone() for b in buffers]
        # Fork the RNG so the label forward's dropout draws do not shift the training forward's masks.
        devices = [x.device] if x.device.type != 'cpu' else []
        device_type = x.device.type if x.device.type != 'cpu' else 'cuda'
        try:
            with torch.random.fork_rng(devices=devices, device_type=device_type):
                out = module(x)
        finally:
            # BatchNorm in train mode updates running stats and num_batches_tracked: put them back untouched.
            if buffers:
                torch._foreach_copy_(buffers, saved)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f'ALPSMixup(model=...) needs a model whose forward returns the (B, K) logits tensor, but it returned '
                f'a {type(out).__name__} (distillation heads, features_only, ...): pass a module that returns the '
                f'logits, e.g. a small nn.Module whose forward is `return model(x)[0]`, or use the fused path '
                f'(model=None with mixup_fn.make_loss())')
        if out.ndim != 2 or out.shape != (x.shape[0], self.num_classes) or not out.is_floating_point():
            raise ValueError(f'the model handle returned {out.dtype} logits of shape {tuple(out.shape)}; expected '
                             f'floating point ({x.shape[0]}, {self.num_classes}) (num_classes={self.num_classes})')
        return out

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Perturb a batch.

        Args:
            x: float images (B, C, H, W) (any shape with the batch first).
            target: class indices (B,) or (B, 1) of any integer dtype, or label distributions (B, K).

        Returns:
            (x_mixed, soft_target): soft_target is (B, K) float32; on the model path it is already adversarial
            and marked so (see `timm_alps.loss.is_adversarial_target`).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'x must be a torch.Tensor, got {type(x).__name__}')
        if not x.is_floating_point():
            raise TypeError(f'ALPSMixup needs floating-point images, got dtype {x.dtype}: convert first, '
                            f'e.g. x.float().div(255) and normalise (or use FastCollateALPSMixup on uint8 batches)')
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f'x must be a non-empty batch with the batch dimension first, got shape {tuple(x.shape)}')
        target = validate_target(target, self.num_classes, x.shape[0])

        if self.mixup_enabled:
            lam, partner = self.sample(x.shape[0], x.device)
            lam = lam.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            x = torch.lerp(x[partner], x, lam)  # lam * x + (1 - lam) * x[partner]
        soft = self.base_target(target, x.device)
        if self.model is not None:
            if self.alps_eps > 0:
                soft = label_from_checked(self._label_logits(x).float(), soft, self.alps_eps)
            mark_adversarial(soft)
        return x, soft

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self._alps_repr()}, label_path={self.label_path!r})'
