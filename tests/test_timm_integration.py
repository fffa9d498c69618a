"""timm's own loader with the ALPS collate on the bundled shards: what a timm user's train.py runs."""
import pytest
import timm
import torch
from timm.data import create_dataset, create_loader

from timm_alps import BUNDLED_DATA_DIR, ALPSMixup, FastCollateALPSMixup

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def train_steps(loader, loss_fn, steps, mixup_fn=None):
    torch.manual_seed(0)
    model = timm.create_model('preact_resnet18_w16', num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step, (x, target) in enumerate(loader):
        if mixup_fn is not None:
            x, target = mixup_fn(x, target)
        loss = loss_fn(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step + 1 == steps:
            break
    return losses


@pytest.mark.parametrize('loss, num_workers', [('ce', 0), ('bce', 1)])
def test_create_loader_with_prefetcher_and_alps_collate(loss, num_workers):
    batch_size = 31  # odd: timm's FastCollateMixup refuses it, ours does not need pairs
    collate = FastCollateALPSMixup(alps_eps=0.3, num_classes=10, label_smoothing=0.1, seed=0)
    dataset = create_dataset('wds/cifar10', root=str(BUNDLED_DATA_DIR), split='train', is_training=True,
                             batch_size=batch_size)
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=batch_size, is_training=True,
                           use_prefetcher=True, device=torch.device('cpu'), collate_fn=collate,
                           num_workers=num_workers, mean=MEAN, std=STD, no_aug=True)
    x, target = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (batch_size, 3, 32, 32)  # normalised by the prefetcher
    assert target.dtype == torch.float32 and target.shape == (batch_size, 10)
    torch.testing.assert_close(target.max(1).values, torch.full((batch_size,), 0.91))  # own smoothed label
    loader.mixup_enabled = False  # timm's --mixup-off-epoch switch reaches the collate
    assert collate.mixup_enabled is False
    collate.mixup_enabled = True
    losses = train_steps(loader, collate.make_loss(loss), steps=3)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_create_loader_without_prefetcher_and_alps_mixup():
    mixup_fn = ALPSMixup(alps_eps=0.3, num_classes=10, seed=0)
    dataset = create_dataset('wds/cifar10', root=str(BUNDLED_DATA_DIR), split='train', is_training=True,
                             batch_size=32)
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=32, is_training=True, use_prefetcher=False,
                           num_workers=0, mean=MEAN, std=STD, no_aug=True)
    losses = train_steps(loader, mixup_fn.make_loss('bce'), steps=2, mixup_fn=mixup_fn)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
