"""Training command lines (timm_alps.train, behind train_timm.py): every bad flag is rejected before anything is
built or written (exit status 2, one line naming the flag), -c YAML checks, the flag table's coverage, and the names
it accepts."""
import pytest
import torch

from timm_alps.train import TrainError, config, main, parse_args, resolve_config

# (flags, the text the one-line error must contain: the flag's name and, where useful, the value)
BAD = [
    (['--clip-grad', '-1'], '--clip-grad -1.0'),
    (['--clip-grad', '0'], '--clip-grad'),
    (['--momentum', 'nan'], '--momentum nan'),
    (['--momentum', '1'], '--momentum'),
    (['--warmup-epochs', '-1'], '--warmup-epochs'),
    (['--cooldown-epochs', '-2'], '--cooldown-epochs'),
    (['--recovery-interval', '-1'], '--recovery-interval'),
    (['--weight-decay', '-1'], '--weight-decay'),
    (['--weight-decay', 'inf'], '--weight-decay'),
    (['--model-ema-decay', '2'], '--model-ema-decay'),
    (['--model-ema-decay', '1'], '--model-ema-decay'),
    (['--alps-beta', '8', 'inf'], '--alps-beta 8.0 inf'),
    (['--alps-beta', '8', '2', '3'], '--alps-beta takes 2'),
    (['--alps-eps', 'nan'], '--alps-eps'),
    (['--alps-prob', '-0.1'], '--alps-prob'),
    (['--lr', 'nan'], '--lr'),
    (['--lr', '-0.1'], '--lr'),
    (['--min-lr', '-1'], '--min-lr'),
    (['--warmup-lr', 'inf'], '--warmup-lr'),
    (['--decay-rate', '0'], '--decay-rate'),
    (['--sched', 'step', '--decay-rate', '2'], '--decay-rate'),
    (['--decay-epochs', '0'], '--decay-epochs'),
    (['--decay-milestones', '150', '100'], '--decay-milestones'),
    (['--smoothing', '-0.1'], '--smoothing'),
    (['--drop', 'nan'], '--drop'),
    (['--drop-path', '1.5'], '--drop-path'),
    (['--hflip', '1.5'], '--hflip'),
    (['--crop-pad', '-1'], '--crop-pad'),
    (['--method', 'mixup', '--mixup-prob', '2'], '--mixup-prob'),
    (['--method', 'mixup', '--mixup-switch-prob', '-1'], '--mixup-switch-prob'),
    (['--cutmix-minmax', '0.5'], '--cutmix-minmax takes 2'),
    (['--cutmix-minmax', '0.8', '0.2'], '--cutmix-minmax'),
    (['--cutmix-minmax', '0', '0.5'], '--cutmix-minmax'),
    (['--cutmix-minmax', '0.2', '1.5'], '--cutmix-minmax'),
    (['--mean', '0.5', 'nan', '0.5'], '--mean'),
    (['--std', '0.2', '0', '0.2'], '--std'),
    (['--opt-betas', '0.9', '1.5'], '--opt-betas'),
    (['--opt-eps', '0'], '--opt-eps'),
    (['--batch-size', '0'], '--batch-size'),
    (['--epochs', '0'], '--epochs'),
    (['--grad-accum-steps', '0'], '--grad-accum-steps'),
    (['--workers', '-1'], '--workers'),
    (['--num-classes', '1'], '--num-classes'),
    (['--seed', '-1'], '--seed'),
    (['--reprob', '1.5'], '--reprob'),
    (['--recount', '0'], '--recount'),
    (['--scale', '0.9', '0.1'], '--scale'),
    (['--ratio', '0', '1'], '--ratio'),
    (['--color-jitter', '-0.4'], '--color-jitter'),
    (['--img-size', '0'], '--img-size'),
    (['--input-size', '3', '32', '-1'], '--input-size'),
    (['--bce-target-thresh', '0.2'], '--bce-target-thresh only applies with --bce-loss'),
    (['--bce-loss', '--bce-pos-weight', '-1'], '--bce-pos-weight'),
    (['--fast-loader-max-mb', 'nan'], '--fast-loader-max-mb'),
    (['--opt', 'sgdd'], "--opt 'sgdd' is unknown"),
    (['--sched', 'cosin'], "--sched 'cosin' is unknown"),
    (['--eval-metric', 'foo'], "--eval-metric 'foo' is unknown"),
    (['--torchcompile', 'nope'], "--torchcompile 'nope' is unknown"),
    (['--method', 'mixup', '--mixup-mode', 'foo'], "--mixup-mode 'foo' is unknown"),
    (['--clip-mode', 'l3'], "--clip-mode 'l3' is unknown"),
    (['--dist-bn', 'sum'], "--dist-bn 'sum' is unknown"),
    (['--amp-dtype', 'float8'], "--amp-dtype 'float8' is unknown"),
    (['--method', 'cutout'], "--method 'cutout' is unknown"),
    (['--alps-mode', 'foo'], "--alps-mode 'foo' is unknown"),
    (['--remode', 'foo'], "--remode 'foo' is unknown"),
    (['--train-interpolation', 'cubic'], "--train-interpolation 'cubic' is unknown"),
    (['--aa', 'rand-zz'], "--aa 'rand-zz'"),
    (['--loader', 'fast', '--aa', 'rand-m9-mstd0.5'], '--aa needs timm\'s loader'),
    (['--loader', 'fast', '--reprob', '0.25'], '--reprob needs timm\'s loader'),
    (['--loader', 'timm', '--crop-pad', '2'], '--crop-pad'),
    (['--method', 'erm', '--alps-off-epoch', '3'], '--alps-off-epoch only applies to --method alps'),
    (['--alps-eps-warmup-epochs', '-1'], '--alps-eps-warmup-epochs -1.0'),
    (['--alps-eps-warmup-epochs', 'nan'], '--alps-eps-warmup-epochs nan'),
    (['--alps-eps-warmup-epochs', 'inf'], '--alps-eps-warmup-epochs inf'),
    (['--method', 'erm', '--alps-eps-warmup-epochs', '1'], '--alps-eps-warmup-epochs only applies to --method alps'),
    (['--mixup', '0.2', '--alps-eps-warmup-epochs', '1'], '--alps-eps-warmup-epochs only applies to --method alps'),
    (['--epochs', '2', '--alps-eps-warmup-epochs', '2.5'], '--alps-eps-warmup-epochs 2.5'),
    (['--epochs', '4', '--alps-off-epoch', '1', '--alps-eps-warmup-epochs', '2'], '--alps-off-epoch 1'),
    (['--mixup-off-epoch', '3'], '--mixup-off-epoch only applies to --method mixup'),
    (['--mixup-prob', '0.5'], '--mixup-prob only applies to --method mixup'),
    (['--method', 'erm', '--mixup-mode', 'elem'], '--mixup-mode only applies to --method mixup'),
    (['--epochs', 'x'], '--epochs'),
    (['--no-such-flag'], '--no-such-flag'),
    (['--num-classes', '5'], '--num-classes 5 but the dataset has 10 classes'),
    (['--train-split', 'nope'], "--train-split 'nope'"),
    (['--val-split', 'validation'], "--val-split 'validation'"),
    (['--model-kwargs', 'width=4', '--opt', 'sgd', '--opt-kwargs', 'bogus=1'], 'could not create optimizer'),
    (['--sched', 'rsqrt', '--max-train-samples', '64', '--max-eval-samples', '64', '-b', '32', '--model-kwargs', 'width=4'],
     'scheduler --sched rsqrt'),
]


def _assert_rejected(tmp_path, flags, expected):
    argv = flags + ['--output', str(tmp_path), '--experiment', 'bad', '--no-progress']
    with pytest.raises(TrainError) as e:
        main(argv)
    message = str(e.value)
    assert e.value.exit_code == 2
    assert expected in message, message
    assert '\n' not in message
    assert not (tmp_path / 'bad').exists()


@pytest.mark.parametrize('flags, expected', BAD, ids=[' '.join(f) for f, _ in BAD])
def test_bad_command_line_is_rejected_up_front(tmp_path, flags, expected):
    _assert_rejected(tmp_path, flags, expected)


@pytest.mark.parametrize('text, expected', [
    ('lr: 0.1\nmomentun: 0.9\n', "unknown key 'momentun'; did you mean 'momentum' (--momentum)?"),
    ('- lr\n- 0.1\n', 'expected a mapping'),
    ('just a string\n', 'expected a mapping'),
    ('lr: fast\n', "argument --lr: invalid float value: 'fast'"),
    ('epochs: 2.5\n', "argument --epochs: invalid int value: '2.5'"),
    ('momentum: .nan\n', '--momentum nan'),
    ('alps_eps_warmup_epochs: one\n', "argument --alps-eps-warmup-epochs: invalid float value: 'one'"),
    ('eval_metric: foo\n', "--eval-metric 'foo' is unknown"),
    ('on_nonfinite: ignore\n', "--on-nonfinite 'ignore' is unknown"),
    ('lr: [0.1\n', 'could not read --config'),
])
def test_bad_config_yaml_is_rejected_up_front(tmp_path, text, expected):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(text)
    _assert_rejected(tmp_path, ['-c', str(cfg)], expected)


def test_every_numeric_flag_has_a_rule():
    """A new numeric flag without a row in FLAG_RULES would go unchecked: fail here instead."""
    numeric = {a.dest for a in config.parser._actions if a.type in (int, float)}
    assert numeric - set(config.FLAG_RULES) == set()
    assert set(config.FLAG_RULES) <= {a.dest for a in config.parser._actions}


def test_named_choices_are_what_timm_builds():
    """Every scheduler name the validator accepts builds with timm's create_scheduler_v2, and the defaults pass."""
    from timm.scheduler import create_scheduler_v2
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    for name in config.SCHEDULERS:
        create_scheduler_v2(opt, sched=name, num_epochs=4, warmup_epochs=1, updates_per_epoch=2)
    resolved = resolve_config(parse_args([]))  # the defaults are valid
    assert resolved.method == 'alps' and resolved.alps_beta == (8.0, 2.0)


def test_finished_runs_args_yaml_is_a_valid_config(tmp_path):
    """args.yaml holds derived keys (rank, world_size, ...) besides the flags: -c accepts it."""
    import yaml
    resolved = resolve_config(parse_args(['--lr', '0.05']))
    data = dict(resolved.to_dict(), rank=0, world_size=1, local_rank=0, distributed=False, progress=False,
                prefetcher=True)
    cfg = tmp_path / 'args.yaml'
    cfg.write_text(yaml.safe_dump(data))
    again = resolve_config(parse_args(['-c', str(cfg)]))
    assert again.lr == 0.05 and again == resolved


def test_native_bf16_detection_and_precision_defaults():
    native = config.cpu_has_native_bf16()
    assert config.resolve_precision(None, None, None, 'cpu') == (native, 'bfloat16', native)
    assert config.resolve_precision(False, None, None, 'cpu') == (False, 'bfloat16', False)  # --no-amp: fp32
    assert config.resolve_precision(None, None, None, 'cuda') == (False, 'float16', False)  # timm's GPU default


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_device_without_cuda_is_rejected(tmp_path):
    _assert_rejected(tmp_path, ['--device', 'cuda'], "could not set up device 'cuda'")


def test_config_values_read_as_the_command_line_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('lr: 1e-3\nalps_beta: [4, 1]\nmodel_kwargs: {width: 4, name: "a=b"}\namp: false\n'
                   'interpolation: bicubic\nbce_loss: true\nepochs: 3\n')
    args = parse_args(['-c', str(cfg), '--epochs', '5'])
    assert (args.lr, args.alps_beta, args.model_kwargs, args.amp, args.bce_loss, args.epochs) == \
        (0.001, [4.0, 1.0], {'width': 4, 'name': 'a=b'}, False, True, 5)  # YAML's 1e-3 is a string to YAML 1.1
    assert parse_args(['-c', str(cfg)]).epochs == 3
