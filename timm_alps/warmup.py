"""EpsWarmup: ramp the ALPS radius in from 0 over the first optimizer updates.

A freshly initialised model has nearly uniform logits, so its least likely class is close to arbitrary and the
adversarial label spends eps/2 of every target on noise; at the paper's radius some runs stall for their first
epochs. Ramping eps linearly from 0 over about one epoch of updates removes the stall and, at convergence, costs
nothing measurable (benchmarks/results/cpu-converged/notes.md). `eps = 0` throughout the ramp's first update is
plain "mix the inputs, keep the own label" training.

The warm-up holds the object that applies the label (an ALPS mixer, or an ALPS loss you built yourself) and sets
its radius; it keeps no other state than the count of updates, so it is picklable and its `state_dict()` is one
integer. Like a learning-rate scheduler, it sets the radius of update 0 when it is made, and `step()` after each
optimizer update moves it on.
"""
from typing import Any, Dict, Optional

from ._validate import eps_arg, int_arg

__all__ = ['EpsWarmup']


class EpsWarmup:
    """Linear ramp of the ALPS radius: ``eps * min(1, num_updates / warmup_updates)``.

    Args:
        target: what applies the label: an `ALPSMixup` / `FastCollateALPSMixup` (its ``alps_eps`` is set, which
            reaches the loss it made with ``make_loss()``) or an ALPS loss (its ``eps`` is set).
        warmup_updates: optimizer updates the ramp lasts (e.g. the updates of one epoch); 0 is no ramp.
        eps: the radius at the end of the ramp; default: the target's radius when the warm-up is made.

    Example:
        ```python
        mixup_fn = ALPSMixup(alps_eps=0.3, num_classes=1000)
        criterion = mixup_fn.make_loss()
        eps_warmup = EpsWarmup(mixup_fn, warmup_updates=len(loader))   # eps 0 now
        for x, y in loader:
            ...; optimizer.step()
            eps_warmup.step()                    # or eps_warmup.step(num_updates), as timm's step_update
        ```
    """

    def __init__(self, target: Any, warmup_updates: int, eps: Optional[float] = None):
        if hasattr(target, 'alps_eps'):
            self._attribute = 'alps_eps'
        elif hasattr(target, 'eps') and hasattr(target, 'forward'):
            self._attribute = 'eps'
        else:
            raise TypeError(f'target must be an ALPS mixer (ALPSMixup, FastCollateALPSMixup) or an ALPS loss, got '
                            f'{type(target).__name__}')
        self.target = target
        self.warmup_updates = int_arg('warmup_updates', warmup_updates, 0)
        self.eps = eps_arg('eps', getattr(target, self._attribute) if eps is None else eps)
        self.num_updates = 0
        self._apply()

    def eps_at(self, num_updates: int) -> float:
        """The radius of the update that follows `num_updates` updates."""
        if num_updates >= self.warmup_updates:
            return self.eps
        return self.eps * num_updates / self.warmup_updates

    def step(self, num_updates: Optional[int] = None) -> float:
        """Count one more update (or set the count, as timm's ``step_update(num_updates)``); returns the radius set.

        Args:
            num_updates: optimizer updates done so far; default: one more than before.
        """
        if num_updates is None:
            self.num_updates += 1
        else:
            self.num_updates = int_arg('num_updates', num_updates, 0)
        return self._apply()

    def _apply(self) -> float:
        eps = self.eps_at(self.num_updates)
        if getattr(self.target, self._attribute) != eps:  # a float compare: no host sync, no work when done
            setattr(self.target, self._attribute, eps)
        return eps

    def state_dict(self) -> Dict[str, Any]:
        """The count of updates, with the ramp it belongs to (checked on load)."""
        return {'num_updates': self.num_updates, 'warmup_updates': self.warmup_updates, 'eps': self.eps}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Continue the ramp of `state_dict`; refuses a state of another ramp (a resume would train another run)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f'state_dict must be a dict from EpsWarmup.state_dict(), got {type(state_dict).__name__}')
        if set(state_dict) != {'num_updates', 'warmup_updates', 'eps'}:
            raise ValueError(f'state_dict has keys {sorted(state_dict)}; an EpsWarmup state has '
                             f"['eps', 'num_updates', 'warmup_updates']")
        for key, mine in (('warmup_updates', self.warmup_updates), ('eps', self.eps)):
            if state_dict[key] != mine:
                raise ValueError(f'state_dict[{key!r}]={state_dict[key]!r} but this warm-up has {key}={mine!r}: it '
                                 f'is the state of another ramp; make the warm-up with the same arguments to resume')
        self.num_updates = int_arg("state_dict['num_updates']", state_dict['num_updates'], 0)
        self._apply()

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(eps={self.eps}, warmup_updates={self.warmup_updates}, '
                f'num_updates={self.num_updates})')
