""" CIFAR-scale models of the MixUp and ALPS papers, registered with timm

* `preact_resnet18`: the PreAct ResNet-18 of `mixup: Beyond Empirical Risk Minimization` (Zhang et al., 2018,
  facebookresearch/mixup-cifar10) used by ALPS (Guo et al., IJCAI 2021): 3x3 stem conv + BN + ReLU, no max-pool,
  pre-activation basic blocks [2, 2, 2, 2] at widths 64-128-256-512, 1x1 conv shortcuts without BN, no final
  norm before pooling (as in the reference code), 4x4 global average pool, linear classifier.
  `preact_resnet18_w16` / `preact_resnet18_w32` are the same network at base width 16 / 32 for CPU-scale runs.
* `vgg16_cifar`: VGG-16 (configuration "D") with BatchNorm for 32x32 inputs: 13 conv3x3-BN-ReLU layers, five
  2x2 max-pools, global pool over the remaining 1x1 map, a single linear classifier on the 512-d features.
  `vgg16_cifar_w24` is the same network at base width 24 for CPU-scale runs.

Both take normalised inputs (CIFAR-10 train mean / std in their pretrained_cfg), keep PyTorch's default init like
the reference code, and apply `drop_rate` as dropout on the pooled penultimate features (the paper's Dropout
baseline uses 0.5). Importing this module registers them, so `timm.create_model('preact_resnet18', num_classes=100)`
works after `import timm_alps`.
"""
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

__all__ = ['PreActResNet', 'PreActBlock', 'VggCifar', 'CIFAR10_MEAN', 'CIFAR10_STD']

# per-channel mean / std of the 50,000 CIFAR-10 training images, in [0, 1] units
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


def _check_width(width: int) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f'width must be a positive int (base channel count, 64 for the paper models), got {width!r}')


class _CifarClassifier(nn.Module):
    """The timm head interface both models share: global pool, dropout on the penultimate features, linear layer.

    Subclasses set `num_features`, `drop_rate`, `global_pool`, `fc` and define `forward_features`.
    """

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

    The shortcut is a bias-free 1x1 conv on the pre-activated input when the shape changes, identity otherwise.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(_CifarClassifier):
    """PreAct ResNet for 32x32 inputs, as in the MixUp / ALPS CIFAR experiments.

    Args:
        layers: Number of blocks per stage.
        width: Base width; the stages have width * (1, 2, 4, 8) channels (64 for the paper model).
        num_classes: Number of classes for the classifier, 0 for no classifier.
        in_chans: Number of input channels.
        global_pool: timm global pool type ('avg', 'max', 'avgmax', '' for none).
        drop_rate: Dropout rate on the pooled penultimate features.
    """

    def __init__(
            self,
            layers: tuple = (2, 2, 2, 2),
            width: int = 64,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        _check_width(width)
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(width, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=width, reduction=1, module='act1')]
        in_chs, reduction = width, 1
        for i, depth in enumerate(layers):
            out_chs, stride = width * 2 ** i, 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(PreActBlock(in_chs, out_chs, stride if j == 0 else 1, **dd))
                in_chs = out_chs
            reduction *= stride
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{i + 1}'))

        self.num_features = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = in_chs * self.global_pool.feat_mult()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stages, x, flatten=True)
        for stage in stages:
            x = stage(x)
        return x


class VggCifar(_CifarClassifier):
    """VGG with BatchNorm for 32x32 inputs and a single linear CIFAR head.

    Args:
        cfg: Conv widths at base width 64, 'M' for a 2x2 max-pool.
        width: Base width; every conv width is scaled by width / 64.
        num_classes: Number of classes for the classifier, 0 for no classifier.
        in_chans: Number of input channels.
        global_pool: timm global pool type; 'avg' over the final 1x1 map for 32x32 inputs.
        drop_rate: Dropout rate on the pooled penultimate features.
    """

    def __init__(
            self,
            cfg: tuple = VGG16_CFG,
            width: int = 64,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        _check_width(width)
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info = []

        layers: List[nn.Module] = []
        prev_chs, reduction = in_chans, 1
        for v in cfg:
            if v == 'M':
                tap = f'features.{len(layers) - 1}'
                self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=tap))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                reduction *= 2
            else:
                chs = max(1, v * width // 64)
                layers += [
                    nn.Conv2d(prev_chs, chs, 3, padding=1, **dd), nn.BatchNorm2d(chs, **dd), nn.ReLU(inplace=True)]
                prev_chs = chs
        self.features = nn.Sequential(*layers)
        self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f'features.{len(layers) - 1}'))

        self.num_features = prev_chs
        self.global_pool, self.fc = create_classifier(prev_chs, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = prev_chs * self.global_pool.feat_mult()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        # conv, BN and ReLU of one layer sit at consecutive indices, so BN params form their own groups (as in timm vgg)
        return dict(stem=r'^features\.0', blocks=r'^features\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # per-module checkpoints would recompute through the in-place ReLUs, so (like timm's vgg) not supported
        if enable:
            raise NotImplementedError('vgg16_cifar does not support gradient checkpointing; use a preact_resnet18*')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (4, 4),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'preact_resnet18': _cfg(),
    'preact_resnet18_w16': _cfg(),
    'preact_resnet18_w32': _cfg(),
    'vgg16_cifar': _cfg(pool_size=(1, 1), first_conv='features.0'),
    'vgg16_cifar_w24': _cfg(pool_size=(1, 1), first_conv='features.0'),
})


def _create(cls, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    # VGG taps sit inside its `features` Sequential, so features_only has to flatten it (as timm's vgg does)
    feature_cfg = dict(flatten_sequential=cls is VggCifar)
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct ResNet-18 of the MixUp / ALPS papers for 32x32 inputs (11.17M params at 10 classes)."""
    model_args = dict(layers=(2, 2, 2, 2))
    return _create(PreActResNet, 'preact_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet18_w16(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct ResNet-18 at base width 16 (16-32-64-128 channels) for CPU-scale runs."""
    model_args = dict(layers=(2, 2, 2, 2), width=16)
    return _create(PreActResNet, 'preact_resnet18_w16', pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet18_w32(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct ResNet-18 at base width 32 (32-64-128-256 channels) for CPU-scale runs."""
    model_args = dict(layers=(2, 2, 2, 2), width=32)
    return _create(PreActResNet, 'preact_resnet18_w32', pretrained, **dict(model_args, **kwargs))


@register_model
def vgg16_cifar(pretrained: bool = False, **kwargs) -> VggCifar:
    """VGG-16 with BatchNorm and a linear head on 512-d features, for 32x32 inputs (14.73M params at 10 classes)."""
    model_args = dict(cfg=VGG16_CFG)
    return _create(VggCifar, 'vgg16_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def vgg16_cifar_w24(pretrained: bool = False, **kwargs) -> VggCifar:
    """VGG-16 at base width 24 (24-48-96-192 channels, 2.08M params at 10 classes) for CPU-scale runs.

    On CPU an epoch costs about 1.15x what `preact_resnet18_w16`'s does: about 560 img/s against 640 for ERM in the
    `cpu-converged` runs (bf16 autocast + channels_last, one thread on a Zen 4 EPYC; docs/training.md).
    """
    model_args = dict(cfg=VGG16_CFG, width=24)
    return _create(VggCifar, 'vgg16_cifar_w24', pretrained, **dict(model_args, **kwargs))
