"""ALPS in a PyTorch Lightning module: mixer in the training step, fused loss, eps warm-up, exact resume.

    pip install lightning "timm-alps @ git+<this repository's URL>"    # or pip install -e . from a clone
    python examples/lightning_alps.py --epochs 3                      # synthetic data, CPU or GPU

What ALPS needs from a Lightning module (see docs/own-loop.md):
- the mixer perturbs the batch in `training_step`, and the loss it made (`mixup_fn.make_loss()`) reads the least
  likely class from this very forward's logits, so ALPS costs no extra forward;
- the eps warm-up steps after each optimizer update, from `self.global_step`;
- `set_epoch` at the start of every epoch, and the mixer's and the warm-up's state in the checkpoint, so a run
  resumed with `Trainer.fit(..., ckpt_path=...)` continues the same random draws and the same ramp;
- the data order must be resumable too: a sampler with `set_epoch` (Lightning calls it every epoch).

Validation uses plain cross-entropy on clean images, as every ALPS evaluation does.
"""
import argparse
from typing import Any, Dict, Tuple

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from timm_alps import ALPSMixup, EpsWarmup


class ALPSClassifier(L.LightningModule):
    """A timm model trained with ALPS.

    Args:
        model_name: timm model name (``test_resnet`` is a 0.4M-parameter ResNet for quick runs).
        num_classes: number of classes.
        lr: SGD learning rate (momentum 0.9).
        alps_eps: L1 radius of the adversarial label ball (the paper's 0.3).
        eps_warmup_updates: optimizer updates over which the radius ramps in from 0 (about one epoch); 0: no ramp.
        seed: seed of the mixer's private random stream (mixing weights and partners).
    """

    def __init__(self, model_name: str = 'test_resnet', num_classes: int = 10, lr: float = 0.05,
                 alps_eps: float = 0.3, eps_warmup_updates: int = 100, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model(model_name, num_classes=num_classes)
        self.mixup_fn = ALPSMixup(alps_alpha=8.0, alps_beta=2.0, alps_eps=alps_eps, num_classes=num_classes,
                                  seed=seed)
        self.criterion = self.mixup_fn.make_loss()  # fused: k* from the training forward's own logits
        self.eps_warmup = EpsWarmup(self.mixup_fn, warmup_updates=eps_warmup_updates)  # eps 0 for update 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        self.mixup_fn.set_epoch(self.current_epoch)

    def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        x, target = self.mixup_fn(x, y)  # mixed images, each with its own label
        loss = self.criterion(self(x), target)  # float32 under bf16-mixed
        self.log('train_loss', loss, prog_bar=True)
        self.log('alps_eps', self.mixup_fn.alps_eps)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.eps_warmup.step(self.global_step)  # global_step counts optimizer updates, as the ramp does

    def validation_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log('val_loss', F.cross_entropy(logits.float(), y))
        self.log('val_acc', (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint['alps_mixup'] = self.mixup_fn.state_dict()
        checkpoint['alps_eps_warmup'] = self.eps_warmup.state_dict()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.mixup_fn.load_state_dict(checkpoint['alps_mixup'])
        self.eps_warmup.load_state_dict(checkpoint['alps_eps_warmup'])


def synthetic_data(num_samples: int, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> TensorDataset:
    """Normalised random images whose class shifts the mean of one channel: learnable, and no download."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (num_samples,), generator=generator)
    x = torch.randn(num_samples, 3, image_size, image_size, generator=generator)
    x[:, 0] += (y.float() / (num_classes - 1) - 0.5).view(-1, 1, 1)
    return TensorDataset(x, y)


class SyntheticData(L.LightningDataModule):
    """Synthetic train/val sets; the training order is resumable.

    The sampler has `set_epoch` (Lightning calls it every epoch), so the order is a function of (seed, epoch) and a
    resumed run sees the order an uninterrupted one would; a `DataLoader(shuffle=True)` draws it from the global
    RNG, which a checkpoint does not hold. Built in `train_dataloader`, after Lightning has started DDP, so each rank
    gets its own share.
    """

    def __init__(self, num_samples: int = 2048, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed

    def setup(self, stage: str) -> None:
        self.train_set = synthetic_data(self.num_samples, seed=self.seed)
        self.val_set = synthetic_data(512, seed=self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = DistributedSampler(self.train_set, num_replicas=None if distributed else 1,
                                     rank=None if distributed else 0, shuffle=True, seed=self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=64, help='per device')
    parser.add_argument('--samples', type=int, default=2048)
    parser.add_argument('--devices', type=int, default=1)
    parser.add_argument('--precision', default='bf16-mixed')
    parser.add_argument('--ckpt-path', default=None, help='resume from this Lightning checkpoint')
    args = parser.parse_args()

    L.seed_everything(0)
    data = SyntheticData(args.samples, args.batch_size)
    updates_per_epoch = args.samples // (args.batch_size * args.devices)
    model = ALPSClassifier(eps_warmup_updates=updates_per_epoch)  # the radius ramps in over the first epoch
    trainer = L.Trainer(max_epochs=args.epochs, devices=args.devices, precision=args.precision, log_every_n_steps=10)
    trainer.fit(model, datamodule=data, ckpt_path=args.ckpt_path)


if __name__ == '__main__':
    main()
