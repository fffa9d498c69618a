"""EpsWarmup: the eps ramp as a library object."""
import pickle

import pytest
import torch

from timm_alps import ALPSMixup, ALPSSoftTargetCrossEntropy, EpsWarmup, FastCollateALPSMixup


@pytest.mark.parametrize('mixer_cls', [ALPSMixup, FastCollateALPSMixup])
def test_ramps_the_mixer_and_its_loss_linearly(mixer_cls):
    mixer = mixer_cls(alps_eps=0.3, num_classes=10)
    criterion = mixer.make_loss()
    warmup = EpsWarmup(mixer, warmup_updates=4)
    assert mixer.alps_eps == 0.0 and criterion.eps == 0.0  # update 0 is made at eps 0, like an LR warm-up
    seen = [warmup.step() for _ in range(6)]
    assert seen == pytest.approx([0.075, 0.15, 0.225, 0.3, 0.3, 0.3])
    assert criterion.eps == 0.3 and mixer.alps_eps == 0.3


def test_step_with_the_update_count_as_timm_step_update():
    mixer = ALPSMixup(alps_eps=0.4, num_classes=10)
    warmup = EpsWarmup(mixer, warmup_updates=10)
    assert warmup.step(5) == pytest.approx(0.2) and mixer.alps_eps == pytest.approx(0.2)
    assert warmup.step(100) == 0.4
    assert warmup.step(0) == 0.0  # the count is set, not accumulated


def test_model_handle_mixer_ramps_its_own_label_and_its_loss_stays_at_zero():
    mixer = ALPSMixup(alps_eps=0.3, num_classes=10, model=torch.nn.Linear(3, 10))
    criterion = mixer.make_loss()
    warmup = EpsWarmup(mixer, warmup_updates=2)
    warmup.step()
    assert mixer.alps_eps == pytest.approx(0.15) and criterion.eps == 0.0


def test_a_loss_can_be_ramped_directly_and_eps_may_be_given():
    criterion = ALPSSoftTargetCrossEntropy(eps=0.3)
    warmup = EpsWarmup(criterion, warmup_updates=2, eps=0.5)
    assert criterion.eps == 0.0
    warmup.step()
    assert criterion.eps == pytest.approx(0.25)


def test_zero_updates_is_no_ramp():
    mixer = ALPSMixup(alps_eps=0.3, num_classes=10)
    EpsWarmup(mixer, warmup_updates=0)
    assert mixer.alps_eps == 0.3


def test_state_dict_resumes_exactly_and_refuses_another_ramp():
    mixer = ALPSMixup(alps_eps=0.3, num_classes=10)
    warmup = EpsWarmup(mixer, warmup_updates=8)
    for _ in range(3):
        warmup.step()
    state = pickle.loads(pickle.dumps(warmup.state_dict()))
    resumed_mixer = ALPSMixup(alps_eps=0.3, num_classes=10)
    resumed = EpsWarmup(resumed_mixer, warmup_updates=8)
    resumed.load_state_dict(state)
    assert resumed_mixer.alps_eps == mixer.alps_eps and resumed.step() == warmup.step()
    with pytest.raises(ValueError, match="state_dict\\['warmup_updates'\\]=8 but this warm-up has warmup_updates=4"):
        EpsWarmup(ALPSMixup(alps_eps=0.3, num_classes=10), warmup_updates=4).load_state_dict(state)
    with pytest.raises(ValueError, match="eps"):
        EpsWarmup(ALPSMixup(alps_eps=0.2, num_classes=10), warmup_updates=8).load_state_dict(state)
    with pytest.raises(ValueError, match='keys'):
        resumed.load_state_dict({'num_updates': 3})
    with pytest.raises(TypeError, match='state_dict must be a dict'):
        resumed.load_state_dict(None)
    with pytest.raises(ValueError, match='num_updates'):
        resumed.load_state_dict(dict(state, num_updates=-1))


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(target=object()), TypeError, 'ALPS mixer .* or an ALPS loss'),
    (dict(target=torch.nn.CrossEntropyLoss()), TypeError, 'ALPS mixer'),
    (dict(warmup_updates=-1), ValueError, 'warmup_updates=-1'),
    (dict(warmup_updates=1.5), TypeError, 'warmup_updates must be an integer'),
    (dict(warmup_updates=True), TypeError, 'warmup_updates must be an integer'),
    (dict(eps=3.0), ValueError, 'eps=3.0'),
    (dict(eps='0.3'), TypeError, 'eps must be a real number'),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(target=ALPSMixup(num_classes=10), warmup_updates=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        EpsWarmup(**args)


def test_bad_step_counts_are_named():
    warmup = EpsWarmup(ALPSMixup(num_classes=10), warmup_updates=4)
    for bad, error in ((-1, ValueError), (2.0, TypeError), (None, None)):
        if error is None:
            warmup.step(bad)  # None: one more
            continue
        with pytest.raises(error, match='num_updates'):
            warmup.step(bad)
