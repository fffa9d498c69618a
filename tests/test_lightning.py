"""ALPS outside train_timm.py: the Lightning example (examples/lightning_alps.py) resumes bit-exactly, and the fused
loss works as the criterion of timm's tasks (timm's train.py hands its train loss to them)."""
import importlib.util
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import ClassificationTask, LogitDistillationTask

from timm_alps import ALPSMixup, EpsWarmup, adversarial_label

EXAMPLE = Path(__file__).resolve().parents[1] / 'examples' / 'lightning_alps.py'


def _example():
    spec = importlib.util.spec_from_file_location('lightning_alps', EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fit(example, epochs, tmp_path, ckpt_path=None, save_to=None):
    """Train the example's module on 64 synthetic images (4 updates an epoch), bf16-mixed on CPU."""
    torch.manual_seed(0)  # the same initial weights in every run (a resumed run loads them from the checkpoint)
    data = example.SyntheticData(num_samples=64, batch_size=16)
    model = example.ALPSClassifier(eps_warmup_updates=6)  # the ramp spans the checkpoint (after 4 updates)
    trainer = L.Trainer(max_epochs=epochs, precision='bf16-mixed', accelerator='cpu', devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model, trainer


def test_lightning_example_resumes_bit_exactly(tmp_path):
    example = _example()
    full, trainer = _fit(example, epochs=3, tmp_path=tmp_path)
    assert trainer.global_step == 12 and full.mixup_fn.alps_eps == 0.3  # the ramp ended after 6 updates

    ckpt = tmp_path / 'epoch1.ckpt'
    first, _ = _fit(example, epochs=1, tmp_path=tmp_path, save_to=ckpt)
    assert first.eps_warmup.num_updates == 4 and first.mixup_fn.alps_eps == pytest.approx(0.2)  # mid-ramp
    saved = torch.load(ckpt, weights_only=True)
    assert saved['alps_eps_warmup']['num_updates'] == 4 and saved['alps_mixup']['generator'] is not None

    resumed, trainer = _fit(example, epochs=3, tmp_path=tmp_path, ckpt_path=ckpt)
    assert trainer.global_step == 12
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f'{name} differs after resume'
    assert resumed.eps_warmup.num_updates == 12 and resumed.mixup_fn.alps_eps == 0.3


def test_lightning_resume_without_the_mixer_state_differs(tmp_path, monkeypatch):
    """The checkpoint hooks are what makes the resume exact: drop them and the weights differ."""
    example = _example()
    full, _ = _fit(example, epochs=2, tmp_path=tmp_path)
    ckpt = tmp_path / 'epoch1.ckpt'
    _fit(example, epochs=1, tmp_path=tmp_path, save_to=ckpt)
    monkeypatch.setattr(example.ALPSClassifier, 'on_load_checkpoint', lambda self, checkpoint: None)
    resumed, _ = _fit(example, epochs=2, tmp_path=tmp_path, ckpt_path=ckpt)
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def _student_teacher():
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=10), timm.create_model('test_vit', num_classes=10).eval()


def test_fused_loss_as_criterion_of_logit_distillation_task():
    """timm's train.py builds LogitDistillationTask(criterion=train_loss_fn): the fused ALPS loss must read the
    student's logits, and the eps warm-up must reach it inside the task."""
    student, teacher = _student_teacher()
    mixup_fn = ALPSMixup(alps_eps=0.3, num_classes=10, seed=0)
    criterion = mixup_fn.make_loss()
    task = LogitDistillationTask(student, teacher, criterion=criterion, verbose=False)
    eps_warmup = EpsWarmup(mixup_fn, warmup_updates=4)
    assert task.criterion.eps == 0.0
    eps_warmup.step(2)
    assert task.criterion.eps == pytest.approx(0.15)  # the task holds the mixer's loss, not a copy
    eps_warmup.step(4)

    x, y = mixup_fn(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    task.train()
    out = task(x, y)
    logits = out['output']
    label = adversarial_label(logits.detach().float(), y, 0.3)
    expected = -(label * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
    torch.testing.assert_close(out['task_loss'], expected)
    soft_target_ce = -(y * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
    assert (out['task_loss'] - soft_target_ce).abs() > 1e-3  # the label really moved
    torch.testing.assert_close(out['loss'], out['task_loss'] + out['kd_loss'])
    out['loss'].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize('loss', ['ce', 'bce'])
def test_fused_loss_as_criterion_of_classification_task(loss):
    student, _ = _student_teacher()
    mixup_fn = ALPSMixup(alps_eps=0.3, num_classes=10, label_smoothing=0.1, seed=0)
    task = ClassificationTask(student, criterion=mixup_fn.make_loss(loss), verbose=False)
    x, y = mixup_fn(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    with torch.autocast('cpu', torch.bfloat16):
        out = task(x, y)
    assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss'])
    label = adversarial_label(out['output'].detach().float(), y, 0.3)
    if loss == 'ce':
        expected = -(label * F.log_softmax(out['output'].float(), dim=1)).sum(1).mean()
    else:
        expected = F.binary_cross_entropy_with_logits(out['output'].float(), label)
    torch.testing.assert_close(out['loss'], expected)
