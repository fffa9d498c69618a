"""Packaging: the timm minimum in pyproject.toml is one that has every timm API this package uses, and the license
field is in its current (PEP 639, SPDX) form."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip('tomllib')  # Python >= 3.11


def _project():
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        return tomllib.load(f)['project']


def _version(text):
    return tuple(int(p) for p in re.findall(r'\d+', text)[:3])


def test_license_is_an_spdx_string():
    assert _project()['license'] == 'Apache-2.0'


def test_timm_minimum_has_every_api_used():
    """Each API below is used by train_timm.py or timm_alps; the newest of them (CheckpointSaver.state_dict,
    utils.trim_summary, utils.load_checkpoint_metadata) first shipped in timm 1.0.31 (absent from the 1.0.30 wheel),
    so that is the minimum. On the installed timm (>= the minimum) every one must exist."""
    import timm
    spec = next(d for d in _project()['dependencies'] if d.startswith('timm'))
    minimum = _version(spec.split('>=')[1])
    assert minimum == (1, 0, 31)
    assert _version(timm.__version__) >= minimum
    from timm import utils
    from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, create_transform, resolve_data_config
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2, list_optimizers, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.task import ClassificationTask
    for name in ('get_checkpoint_state', 'load_checkpoint_state', 'prepare_distributed', 'compile', 'setup_ema',
                 'update_ema', 'get_clip_parameters', 'get_eval_model', 'get_trainable_module'):
        assert hasattr(ClassificationTask, name), name
    for name in ('state_dict', 'load_state_dict', '_save', '_replace', '_duplicate', 'save_recovery'):
        assert hasattr(utils.CheckpointSaver, name), name
    for name in ('trim_summary', 'load_checkpoint_metadata', 'ParseKwargs', 'init_distributed_device', 'distribute_bn',
                 'dispatch_clip_grad', 'update_summary', 'random_seed', 'NativeScaler'):
        assert hasattr(utils, name), name
    import inspect
    assert 'task' in inspect.signature(utils.CheckpointSaver).parameters
    assert 'need_update' in inspect.signature(utils.NativeScaler.__call__).parameters
    assert callable(create_loader) and callable(create_dataset) and callable(create_transform)
    assert Mixup and FastCollateMixup and BinaryCrossEntropy and LabelSmoothingCrossEntropy and SoftTargetCrossEntropy
    assert create_optimizer_v2 and list_optimizers and optimizer_kwargs and create_scheduler_v2 and scheduler_kwargs
    assert resolve_data_config


def test_console_scripts_point_at_the_engine_and_the_converter():
    """`pip install timm-alps` users get the training CLI of train_timm.py as `timm-alps-train`."""
    import importlib
    scripts = _project()['scripts']
    for name, target in (('timm-alps-train', 'timm_alps.train.run:console_main'),
                         ('timm-alps-convert', 'timm_alps.data:main')):
        assert scripts[name] == target
        module, func = target.split(':')
        assert callable(getattr(importlib.import_module(module), func))


def test_the_script_is_a_thin_cli_over_the_package():
    """train_timm.py holds no training code of its own: the engine ships in the wheel (timm_alps.train)."""
    with open(os.path.join(REPO, 'train_timm.py')) as f:
        code = [line for line in f if line.strip() and not line.startswith(('#', ' ', '"'))]
    assert len(code) <= 6, code
