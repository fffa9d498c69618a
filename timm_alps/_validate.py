"""Argument checks, in one place: every user value is checked here when it enters, inner code trusts it.

Each check returns the value in its canonical Python type or raises a `TypeError`/`ValueError` that names the
argument and the bad value.
"""
import math
import numbers
import operator
from typing import Optional, Sequence

import torch

__all__ = ['real_arg', 'eps_arg', 'int_arg', 'bool_arg', 'choice_arg', 'weight_arg']


def real_arg(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the interval, accepting Python/numpy reals and one-element tensors.

    Bools, strings, None and larger tensors are refused.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f'{name} must be a number or a one-element tensor (a single number), got a tensor '
                             f'of shape {tuple(value.shape)}')
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a real number, got {value!r} ({type(value).__name__})')
    value = float(value)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if not math.isfinite(value):
        raise ValueError(f'{name}={value} must be a finite number in {interval}')
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        raise ValueError(f'{name}={value} is outside {interval}')
    return value


def eps_arg(name: str, value) -> float:
    """An L1 radius between label distributions, in [0, 2]."""
    if value is None:
        raise TypeError(f'{name} must be a number in [0, 2], got None ({name} must be a real number; 0 turns the '
                        f'adversarial label off)')
    try:
        return real_arg(name, value, 0.0, 2.0)
    except ValueError as e:
        raise ValueError(f'{e}: it is an L1 radius between label distributions') from None


def int_arg(name: str, value, low: int, high: Optional[int] = None) -> int:
    """`value` as a Python int in [low, high), accepting numpy/torch integers; bools and floats are refused."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise TypeError(f'{name} must be an integer, got {value!r}')
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f'{name} must be an integer, got {value!r} ({type(value).__name__})') from None
    if value < low or (high is not None and value >= high):
        if high is None:
            bound = f'>= {low}'
        else:  # 2**64 reads better than its digits
            bound = f'in [{low}, 2**{high.bit_length() - 1})' if high & (high - 1) == 0 else f'in [{low}, {high})'
        raise ValueError(f'{name}={value} must be {bound}')
    return value


def bool_arg(name: str, value) -> bool:
    """A real bool (numpy bools too): 'false', 0 or None would silently mean something else."""
    if isinstance(value, bool) or type(value).__name__ == 'bool_':
        return bool(value)
    raise TypeError(f'{name} must be True or False, got {value!r} ({type(value).__name__})')


def choice_arg(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; use one of {', '.join(map(repr, choices))}")
    return value


def weight_arg(name: str, value, low: Optional[float] = None) -> Optional[torch.Tensor]:
    """None, or a finite float32 tensor (a number or a 1-D per-class vector), every entry >= `low` if given.

    Numbers, sequences and numpy arrays are converted as timm does. The length against the number of classes is
    checked at the first call, where the classes are known (`check_weight_length`).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f'{name} must be a number or a per-class tensor, got {value!r}')
    try:
        tensor = torch.as_tensor(value, dtype=torch.float32) if not isinstance(value, torch.Tensor) else value
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f'{name} must be a number or a per-class tensor, got {value!r} '
                        f'({type(value).__name__})') from None
    if not tensor.is_floating_point() and tensor.dtype != torch.int64 and tensor.dtype != torch.int32:
        raise TypeError(f'{name} must hold real numbers, got dtype {tensor.dtype}')
    tensor = tensor.detach().float()
    if tensor.ndim > 1:
        raise ValueError(f'{name} must be a number or a 1-D per-class tensor, got shape {tuple(tensor.shape)}')
    host = tensor.cpu()
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f'{name} must be finite, got {host.tolist()}')
    if low is not None and bool((host < low).any()):
        raise ValueError(f'{name} must be >= {low:g} everywhere, got {host.tolist()}')
    return tensor


def check_weight_length(name: str, weight: Optional[torch.Tensor], num_classes: int) -> None:
    """A per-class weight must have one entry per class (a single number broadcasts)."""
    if weight is not None and weight.numel() != 1 and weight.shape[0] != num_classes:
        raise ValueError(f'{name} has {weight.shape[0]} entries but the logits have {num_classes} classes')
