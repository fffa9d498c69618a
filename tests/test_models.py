import pytest
import timm
import torch

import timm_alps.models  # noqa: F401  registers the models
from timm_alps.models import CIFAR10_MEAN, CIFAR10_STD

# exact counts at 10 classes; preact_resnet18 = kuangliu's PreActResNet18 (11,171,146) + the stem BN of the
# mixup-cifar10 code (128), vgg16_cifar = VGG-16-BN conv stack + Linear(512, 10)
PARAMS = {
    'preact_resnet18': 11_171_274,
    'preact_resnet18_w32': 2_796_266,
    'preact_resnet18_w16': 700_794,
    'vgg16_cifar': 14_728_266,
    'vgg16_cifar_w24': 2_075_746,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registered():
    assert set(timm.list_models('preact*')) >= {'preact_resnet18', 'preact_resnet18_w16', 'preact_resnet18_w32'}
    assert {'vgg16_cifar', 'vgg16_cifar_w24'} <= set(timm.list_models('vgg16*'))
    assert timm.models.model_entrypoint('vgg16').__module__ == 'timm.models.vgg'  # timm's own vgg16 is untouched


@pytest.mark.parametrize('name', list(PARAMS))
def test_params_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    assert n_params(model) == PARAMS[name]
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32) and cfg['num_classes'] == 10
    assert cfg['mean'] == CIFAR10_MEAN and cfg['std'] == CIFAR10_STD
    assert isinstance(model.get_submodule(cfg['first_conv']), torch.nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)


def test_width_kwarg():
    assert n_params(timm.create_model('preact_resnet18', width=16)) == PARAMS['preact_resnet18_w16']
    assert timm.create_model('vgg16_cifar', width=32).num_features == 256
    with pytest.raises(ValueError, match='width'):
        timm.create_model('preact_resnet18', width=0)


@pytest.mark.parametrize('name', ['preact_resnet18_w16', 'vgg16_cifar'])
def test_drop_rate_on_penultimate(name):
    torch.manual_seed(0)
    kw = dict(width=16) if name == 'vgg16_cifar' else {}
    x = torch.randn(16, 3, 32, 32)
    model = timm.create_model(name, drop_rate=0.5, **kw)
    model.eval()
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert torch.equal(model.forward_head(feats), model.fc(pre))
    model.train()
    dropped = model.forward_head(feats, pre_logits=True)
    # inverted dropout: survivors scaled by 1 / (1 - p), about half of the (post-ReLU nonzero) features zeroed
    active, kept = pre != 0, dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * pre[kept])
    assert 0.4 < (~kept[active]).float().mean() < 0.6

    model0 = timm.create_model(name, drop_rate=0., **kw)
    model0.load_state_dict(model.state_dict())
    model0.train()
    assert torch.equal(model0.forward_head(feats, pre_logits=True), pre)


@pytest.mark.parametrize('name', ['preact_resnet18_w16', 'vgg16_cifar'])
def test_reset_classifier_in_chans_num_classes(name):
    model = timm.create_model(name, num_classes=100, in_chans=1, width=16)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, model.num_features)
    model.reset_classifier(3, global_pool='catavgmax')
    assert model.head_hidden_size == 2 * model.num_features
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_features_only_and_grad_checkpointing():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    model = timm.create_model('preact_resnet18_w16').eval()
    feats = timm.create_model('preact_resnet18_w16', features_only=True).eval()
    feats.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('fc.')})
    outs = feats(x)
    assert [o.shape[1] for o in outs] == [16, 16, 32, 64, 128]
    torch.testing.assert_close(outs[-1], model.forward_features(x))

    model.train()
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)
    with pytest.raises(NotImplementedError):
        timm.create_model('vgg16_cifar', width=16).set_grad_checkpointing(True)
