"""ALPSSoftTargetCrossEntropy: a drop-in for timm's SoftTargetCrossEntropy."""
import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from timm_alps import ALPSSoftTargetCrossEntropy, adversarial_label


def test_eps_zero_is_timm_soft_target_cross_entropy():
    logits = torch.randn(8, 10)
    soft = torch.softmax(torch.randn(8, 10), 1)
    torch.testing.assert_close(ALPSSoftTargetCrossEntropy(eps=0)(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    hard = torch.randint(10, (8,))
    torch.testing.assert_close(ALPSSoftTargetCrossEntropy(eps=0)(logits, hard), F.cross_entropy(logits, hard))


@pytest.mark.parametrize('soft', [False, True])
def test_value_and_gradient_are_soft_cross_entropy_at_the_fixed_label(soft):
    torch.manual_seed(0)
    logits = torch.randn(16, 10, requires_grad=True)
    target = torch.softmax(torch.randn(16, 10), 1) if soft else torch.randint(10, (16,))
    loss = ALPSSoftTargetCrossEntropy(eps=0.3)(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)

    rho = adversarial_label(logits.detach(), target, 0.3)
    reference = SoftTargetCrossEntropy()(logits, rho)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)
    # the label really moved: the loss is above the clean soft cross-entropy
    clean = target if soft else F.one_hot(target, 10).float()
    assert loss > SoftTargetCrossEntropy()(logits, clean)


def test_adversarial_loss_is_never_below_clean_loss():
    torch.manual_seed(1)
    logits = torch.randn(64, 100)
    target = torch.randint(100, (64,))
    assert ALPSSoftTargetCrossEntropy(eps=0.3)(logits, target) >= F.cross_entropy(logits, target)


@pytest.mark.parametrize('eps', [-0.01, 2.01])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match=f'eps={eps}'):
        ALPSSoftTargetCrossEntropy(eps=eps)


def test_non_finite_logits_are_not_silent():
    logits = torch.randn(2, 5)
    logits[0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN or inf'):
        ALPSSoftTargetCrossEntropy(eps=0.3)(logits, torch.tensor([0, 1]))
