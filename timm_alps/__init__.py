"""ALPS (Adversarial Labelling of Perturbed Samples, Guo et al., IJCAI 2021) for timm.

Swap `timm.data.Mixup` for `ALPSMixup` (`FastCollateMixup` for `FastCollateALPSMixup` on timm's prefetcher path) and
build the loss with `mixup_fn.make_loss()` ('ce' or 'bce'): `ALPSSoftTargetCrossEntropy`, `ALPSBinaryCrossEntropy`,
or `ALPSLoss` around any other soft-target loss.
Importing this package also registers the paper's CIFAR models with timm (`preact_resnet18`, `vgg16_cifar`).
"""
from .labels import adversarial_label
from .loss import ALPSBinaryCrossEntropy, ALPSLoss, ALPSSoftTargetCrossEntropy, is_adversarial_target
from .mixup import ALPSMixup
from .collate import FastCollateALPSMixup
from . import models  # registers preact_resnet18*, vgg16_cifar with timm
from .data import BUNDLED_DATA_DIR, InMemoryLoader, load_split_tensors
from .task import ALPSTask
from .warmup import EpsWarmup
from .attacks import (NormalizedModel, apgd_ce, evaluate_robustness, fgsm, load_checkpoint_model, pgd,
                      transfer_attack, unbounded_pgd)
from .autoattack import AutoAttack, AutoAttackResult, autoattack  # attacks need the [robustness] extra

__version__ = '0.1.0'
__all__ = ['adversarial_label', 'ALPSMixup', 'FastCollateALPSMixup', 'ALPSSoftTargetCrossEntropy',
           'ALPSBinaryCrossEntropy', 'ALPSLoss', 'is_adversarial_target', 'ALPSTask', 'EpsWarmup', 'BUNDLED_DATA_DIR',
           'InMemoryLoader', 'load_split_tensors', 'NormalizedModel', 'apgd_ce', 'evaluate_robustness', 'fgsm',
           'load_checkpoint_model', 'pgd', 'transfer_attack', 'unbounded_pgd', 'AutoAttack', 'AutoAttackResult',
           'autoattack']
