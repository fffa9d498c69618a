"""Tests for `benchmarks.reproduce`: the smoke preset end to end on the bundled data, and the runner's pieces."""
import contextlib
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import reproduce as R
from benchmarks import reproduce_report as report
from benchmarks.paper_numbers import PAPER_ERRORS, paper_error


def test_paper_numbers_tables():
    assert paper_error('cifar10', 'preact_resnet18', 'alps', 'clean') == (4.15, 0.129)
    assert paper_error('cifar10', 'preact_resnet18', 'mixup', 'white-box/pgd') == (71.02, 1.018)
    assert paper_error('cifar100', 'vgg16_cifar', 'erm', 'clean') == (28.87, 0.297)
    assert paper_error('cifar100', 'preact_resnet18', 'alps', 'black-box/fgsm') == (32.84, 0.237)
    # Tables 5-6 are PreActResNet18 only
    assert paper_error('cifar10', 'vgg16_cifar', 'alps', 'white-box/fgsm') is None
    assert len(PAPER_ERRORS) == 4


def test_milestones_scale_with_epochs():
    # the paper: LR /10 once 100 and 150 epochs are done; timm applies milestone m from 1-based epoch m
    assert R.milestones(R.get_preset('paper')) == [101, 151]
    assert R.milestones(R.get_preset('paper', epochs=20)) == [11, 16]
    assert R.milestones(R.get_preset('cpu', epochs=6)) == [3, 5]  # two epochs per LR
    assert R.milestones(R.get_preset('cpu', epochs=1)) == [1]


def test_milestones_mean_what_timm_does():
    import timm.scheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = timm.scheduler.MultiStepLRScheduler(opt, decay_t=R.milestones(R.get_preset('paper', epochs=20)),
                                                decay_rate=0.1)
    lrs = [opt.param_groups[0]['lr']]
    for epoch in range(1, 20):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]['lr'])
    # 10 epochs at 0.1, 5 at 0.01, 5 at 0.001: the paper's 100/50/50 split at 1/10 scale
    assert [round(lr, 6) for lr in lrs] == [0.1] * 10 + [0.01] * 5 + [0.001] * 5


def test_get_preset_rejects_bad_input():
    with pytest.raises(ValueError, match='unknown preset'):
        R.get_preset('nope')
    with pytest.raises(ValueError, match='unknown method'):
        R.get_preset('cpu', methods=['erm', 'cutout'])
    with pytest.raises(ValueError, match='--epochs'):
        R.get_preset('cpu', epochs=0)


def test_parse_sweep():
    assert R.parse_sweep('eps=0.1,0.3') == ('eps', [('eps0.1', {'alps_eps': 0.1}), ('eps0.3', {'alps_eps': 0.3})])
    name, values = R.parse_sweep('beta=0.875,4:2')
    assert name == 'beta'
    assert values[0][1]['alps_beta'] == pytest.approx((8.0, 2.0))  # mode (a - 1) / a = 0.875
    assert values[1][1]['alps_beta'] == (4.0, 2.0)
    for bad in ('eps', 'eps=', 'eps=-0.1', 'beta=1.2', 'gamma=1'):
        with pytest.raises(ValueError):
            R.parse_sweep(bad)


def test_plan_runs_order_and_sweep(tmp_path):
    preset = R.get_preset('cpu', seeds=[0, 1])
    runs = R.plan_runs(preset, tmp_path)
    names = [r.name for r in runs]
    # the two ERM models (black-box sources of seeds 0 and 1) first, then the rest of seed 0
    assert names[:6] == ['erm-s0', 'erm-s1', 'mixup-s0', 'alps-s0', 'ls-s0', 'dropout-s0']
    assert len(names) == 10 and len(set(names)) == 10
    sweep = R.plan_runs(R.get_preset('cpu', seeds=[0]), tmp_path, 'eps=0.1,0.3')
    # the preset's own eps is the main ALPS run, not a second copy of it
    assert [r.name for r in sweep] == ['alps-eps0.1-s0', 'alps-s0']
    assert sweep[0].alps == {'alps_eps': 0.1, 'alps_beta': (8.0, 2.0)}


def test_transfer_source_is_another_erm_model(tmp_path):
    run = R.Run('cifar10', 'm', 'alps', 0, group_dir=tmp_path)
    assert R.transfer_source(run, [0, 1]).name == 'erm-s1'
    assert R.transfer_source(R.Run('cifar10', 'm', 'erm', 1, group_dir=tmp_path), [0, 1]).name == 'erm-s0'
    assert R.transfer_source(run, [0]).name == 'erm-s0'


def test_resolve_data(tmp_path):
    preset = R.get_preset('paper')
    with pytest.raises(ValueError, match='DATASET=PATH'):
        R.resolve_data(preset, [str(tmp_path)])
    with pytest.raises(ValueError, match='no dataset'):
        R.resolve_data(preset, ['svhn=/x.npz'])
    data = R.resolve_data(preset, [f'cifar100={tmp_path}'])
    assert data['cifar100'] == str(tmp_path)
    assert R.resolve_data(R.get_preset('cpu'), [str(tmp_path)]) == {'cifar10': str(tmp_path)}


def test_train_command_has_the_recipe(tmp_path):
    preset = R.get_preset('paper')
    run = next(r for r in R.plan_runs(preset, tmp_path) if r.name == 'alps-s0')
    cmd = R.train_command(run, preset, '/data', 'wds/cifar10')
    text = ' '.join(cmd)
    for piece in ('--epochs 200', '-b 128', '--lr 0.1', '--weight-decay 1e-4', '--sched multistep',
                  '--decay-milestones 101 151', '--alps-eps 0.3', '--alps-beta 8 2', '--amp-dtype bfloat16',
                  '--experiment alps-s0', '--seed 0', '--opt momentum --lr 0.1 --momentum 0.9'):
        assert piece in text
    assert '--resume' not in cmd


def test_cpu_preset_keeps_the_optimizer_its_results_were_trained_with(tmp_path):
    # the committed cpu results used timm's `sgd` (Nesterov); the paper preset uses classical momentum
    preset = R.get_preset('cpu')
    cmd = R.train_command(R.plan_runs(preset, tmp_path)[0], preset, '/data', 'wds/cifar10')
    assert cmd[cmd.index('--opt') + 1] == 'sgd'


def _fake_checkpoint(run_dir: Path, epoch: int) -> None:
    run_dir.mkdir(parents=True)
    torch.save({'state_dict': {}, 'optimizer': {}, 'epoch': epoch}, run_dir / 'last.pth.tar')


def test_interrupted_run_is_resumed_and_finished_run_skipped(tmp_path):
    preset = R.get_preset('smoke', epochs=3)
    run = R.Run('cifar10', 'preact_resnet18_w16', 'erm', 0, group_dir=tmp_path)
    assert R.run_status(run, preset) == 'missing'
    real = R.train_command(run, preset, '/data', 'wds/cifar10')
    _fake_checkpoint(run.dir, epoch=0)  # one of three epochs done
    assert R.run_status(run, preset) == 'partial'
    # a stand-in for train_timm.py that prints its arguments: the runner must add --resume auto
    fake = tmp_path / 'fake_train.py'
    fake.write_text('import sys; print("ARGV", sys.argv[1:])')
    echo = [sys.executable, str(fake)] + real[2:]
    assert R.train(run, echo, preset, invocation='python -m benchmarks.reproduce --preset smoke') == 'partial'
    assert "'--resume', 'auto']" in run.log_path.read_text()
    meta = json.loads(run.meta_path.read_text())
    assert meta['command'] == echo and len(meta['slices']) == 1 and meta['slices'][0]['resumed']
    assert meta['slices'][0]['invocation'] == 'python -m benchmarks.reproduce --preset smoke'
    # the same recipe elsewhere (data moved, a speed flag added) resumes; another recipe does not
    moved = R.train_command(run, R.get_preset('smoke', epochs=3, train_args=['--torchcompile']), '/gpu/data',
                            'wds/cifar10')
    assert R.train(run, echo[:2] + moved[2:], preset) == 'partial'
    with pytest.raises(ValueError, match='another recipe'):
        R.train(run, echo[:2] + R.train_command(run, R.get_preset('smoke', epochs=3), '/d', 'wds/x')[2:]
                + ['--lr', '1'], dict(preset, lr=1.0))

    done = R.Run('cifar10', 'preact_resnet18_w16', 'erm', 1, group_dir=tmp_path)
    _fake_checkpoint(done.dir, epoch=2)
    with open(done.dir / 'summary.csv', 'w') as f:
        f.write('epoch,train_loss,eval_loss,eval_top1\n' + ''.join(f'{e},1,1,50\n' for e in range(3)))
    assert R.run_status(done, preset) == 'finished'
    assert R.train(done, ['false'], preset) == 'finished'
    assert not done.meta_path.exists()  # nothing was launched
    # a time budget already spent launches nothing
    later = R.Run('cifar10', 'preact_resnet18_w16', 'erm', 2, group_dir=tmp_path)
    assert R.train(later, ['false'], preset, deadline=0.0) == 'missing' and not later.meta_path.exists()


def test_black_box_waits_for_finished_runs(tmp_path):
    preset = R.get_preset('smoke', seeds=[0, 1])
    runs = R.plan_runs(preset, tmp_path)
    _fake_checkpoint(runs[0].dir, epoch=0)  # erm-s0 interrupted, the rest never started: nothing to attack yet
    R.evaluate_black_box(runs, preset, {'cifar10': 'unused'})
    assert not list(tmp_path.rglob('eval.json'))


def test_dry_run_prints_commands(tmp_path, capsys):
    assert R.main(['--preset', 'paper', '--dry-run', '--runs-dir', str(tmp_path),
                   '--data', f'cifar10={tmp_path}', '--data', f'cifar100={tmp_path}']) == 0
    out = capsys.readouterr().out
    assert out.count('train_timm.py') == 2 * 2 * 3 * 5  # datasets x models x seeds x methods
    assert 'vgg16_cifar' in out and 'cifar100' in out
    assert not any(tmp_path.iterdir())


def test_cpu_converged_preset(tmp_path, capsys):
    """Issue 14's definition: CIFAR-10, w16 (w32 on request), >= 50 epochs of the paper's step schedule, batch 128,
    classical momentum, ERM / MixUp / ALPS x 2 seeds (LS, Dropout on request), AutoAttack at 8/255 and 4/255 on
    >= 500 images, the unbounded check and the eps-in-normalised-units columns."""
    preset = R.get_preset('cpu-converged')
    assert preset['epochs'] >= 50 and preset['batch_size'] == 128 and preset['opt'] == 'momentum'
    # plus the eps-ramp arm of section 2, compared with ALPS at convergence
    assert preset['methods'] == ('erm', 'mixup', 'alps', 'alps-ramp') and preset['seeds'] == (0, 1)
    assert R.milestones(preset) == [31, 46]
    ev = preset['eval']
    assert ev['autoattack_samples'] >= 500 and tuple(ev['autoattack_eps']) == (8, 4) and ev['normalised_eps']
    assert (ev.get('autoattack_steps', 100), ev.get('autoattack_queries', 5000)) == (100, 5000)
    assert 'white-box/autoattack@8' in R.table_metrics(ev) and 'black-box/pgd@norm' in R.table_metrics(ev)
    wide = R.get_preset('cpu-converged', models=['preact_resnet18_w32'], methods=['ls', 'dropout'], epochs=80)
    assert wide['models'] == ('preact_resnet18_w32',) and wide['epochs'] == 80 and R.milestones(wide) == [41, 61]
    runs = R.plan_runs(preset, tmp_path)
    assert sorted(r.name for r in runs) == sorted(f'{m}-s{s}' for m in ('erm', 'mixup', 'alps', 'alps-ramp') for s in (0, 1))
    cmd = ' '.join(R.train_command(runs[-1], preset, '/d', 'wds/cifar10'))
    for piece in ('--epochs 60', '-b 128', '--opt momentum --lr 0.1 --momentum 0.9', '--decay-milestones 31 46',
                  '--warmup-epochs 1'):
        assert piece in cmd, piece
    alps = next(r for r in runs if r.method == 'alps')
    assert '--alps-eps 0.3 --alps-beta 8 2' in ' '.join(R.train_command(alps, preset, '/d', 'wds/cifar10'))
    mixup = next(r for r in runs if r.method == 'mixup')
    assert '--mixup 1.0' in ' '.join(R.train_command(mixup, preset, '/d', 'wds/cifar10'))

    # --dry-run prints every command and the protocol, touches nothing
    assert R.main(['--preset', 'cpu-converged', '--dry-run', '--runs-dir', str(tmp_path / 'runs'),
                   '--data', str(tmp_path / 'cifar10.npz')]) == 0
    out = capsys.readouterr().out
    assert out.count('train_timm.py') == 8 and 'AutoAttack (standard version' in out and 'normalised-input' in out
    assert not (tmp_path / 'runs').exists()


def test_eps_hypothesis_names_the_closer_reading():
    rows = [dict(group='g', method='erm', tag='', paper={'white-box/fgsm': (39.02, 1.0)},
                 values={'white-box/fgsm': [98.0], 'white-box/fgsm@norm': [45.0]})]
    line, = R.eps_hypothesis(rows, pixels=1.0 / 255)
    assert '**normalised-input eps** is closer' in line and '1.00/255 in pixels' in line


def test_goal_checks_report_contradictions():
    rows = [dict(group='g', method=m, tag='', values={'clean': [c], 'white-box/fgsm': [f], 'white-box/pgd': [p]})
            for m, c, f, p in (('erm', 10, 50, 70), ('mixup', 9, 45, 80), ('alps', 9.5, 30, 60))]
    lines = R.goal_checks(rows)
    assert any('ALPS clean error <= MixUp: **NO**' in line for line in lines)
    assert any('MixUp clean error < ERM: **yes**' in line for line in lines)
    assert sum('**yes**' in line for line in lines) == 5


def test_goal_checks_weigh_alps_against_label_smoothing_and_dropout():
    """ALPS against each extra baseline (clean, PGD-10 white and black, APGD-CE, AutoAttack), and whether the baseline's
    own resistance holds against ERM under the stronger attacks (masking shows as PGD yes, AutoAttack NO)."""
    metrics = ('clean', 'white-box/fgsm', 'white-box/pgd', 'black-box/pgd', 'white-box/apgd-ce',
               'white-box/autoattack@8')
    rows = [dict(group='g', method=m, tag='', values=dict(zip(metrics, ([v] for v in vals))))
            for m, vals in (('erm', (10, 80, 100, 78, 100, 100)), ('ls', (9.4, 50, 95, 76, 99.4, 100)),
                            ('mixup', (11, 66, 98, 67, 100, 100)), ('alps', (9.6, 51, 93, 55, 99, 100)))]
    lines = R.goal_checks(rows, {'clean': 10000, 'white-box/pgd': 1000, 'black-box/pgd': 1000,
                                 'white-box/apgd-ce': 500, 'white-box/autoattack@8': 500})
    get = lambda text: next(line for line in lines if f': {text}:' in line)  # noqa: E731
    assert '**NO**' in get('ALPS clean error <= Label smoothing') and 'within noise' in get(
        'ALPS clean error <= Label smoothing')
    assert '**yes**' in get('ALPS PGD-10 white error < Label smoothing')
    assert '**yes**' in get('ALPS APGD-CE white error < Label smoothing')
    assert '**NO**' in get('ALPS AutoAttack 8/255 error < Label smoothing')
    assert '**yes**' in get('Label smoothing PGD-10 white error < ERM')
    # transfer from ERM: ALPS's resistance carries over beyond noise, label smoothing's not (Fu et al.)
    assert '**yes**' in get('ALPS PGD-10 black error < Label smoothing') and 'beyond noise' in get(
        'ALPS PGD-10 black error < Label smoothing')
    assert 'within noise' in get('Label smoothing PGD-10 black error < ERM')
    assert '**NO**' in get('Label smoothing AutoAttack 8/255 error < ERM')
    assert not any('Dropout' in line for line in lines)  # no Dropout runs, no Dropout claims


def test_eps_ramp_arm_trains_alps_with_the_ramp_and_is_checked_against_alps(tmp_path):
    preset = R.get_preset('cpu-converged', seeds=[0])
    ramp, = [r for r in R.plan_runs(preset, tmp_path) if r.method == 'alps-ramp']
    cmd = R.train_command(ramp, preset, 'data', 'wds/cifar10')
    flags = ' '.join(cmd)
    assert '--method alps --alps-eps-warmup-epochs 1' in flags and '--alps-eps 0.3 --alps-beta 8 2' in flags
    rows = [dict(group='g', method=m, tag='', values={'clean': [c], 'white-box/pgd': [p]})
            for m, c, p in (('alps', 10, 60), ('alps-ramp', 10.5, 59))]
    lines = R.goal_checks(rows)
    assert any('ALPS + eps ramp clean error <= ALPS: **NO**' in line for line in lines)
    assert any('ALPS + eps ramp PGD-10 error <= ALPS: **yes**' in line or
               ('ALPS + eps ramp' in line and 'PGD' in line and '**yes**' in line) for line in lines)


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    """Every method trains on the bundled subset, is attacked, and lands in the table; a second call skips all."""
    runs_dir, results_dir = tmp_path / 'runs', tmp_path / 'results'
    argv = ['--preset', 'smoke', '--runs-dir', str(runs_dir), '--results-dir', str(results_dir),
            '--jobs', '2', '--threads', '1']
    assert R.main(argv) == 0
    out = results_dir / 'smoke'
    for name in ('table.md', 'table.csv', 'curves.png', 'eps.png', 'runs.csv', 'commands.md', 'environment.json'):
        assert (out / name).is_file(), name
    with open(out / 'table.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert {r['method'] for r in rows} == set(R.DEFAULT_METHODS)
    for r in rows:
        assert r['n_seeds'] == '1', r
        assert 0.0 <= float(r['mean']) <= 100.0
    table = (out / 'table.md').read_text()
    assert 'missing' not in table
    assert '[6.13]' in table  # the paper's ERM clean error beside ours
    commands = (out / 'commands.md').read_text()
    assert commands.count('train_timm.py') == 5
    env = json.loads((out / 'environment.json').read_text())
    assert env['torch'] == torch.__version__

    rows = {r['run']: r for r in csv.DictReader(open(out / 'runs.csv', newline=''))}
    assert set(rows) == {f'{m}-s0' for m in R.DEFAULT_METHODS}
    for row in rows.values():  # the durable record: every metric of the table, the curves, the command
        assert row['status'] == 'finished' and row['white-box/autoattack@8'] and row['black-box/pgd@norm'], row
        assert json.loads(row['curve']) and json.loads(row['pgd_curve']) and 'train_timm.py' in row['command']

    metas = sorted(runs_dir.glob('smoke/*/*.reproduce.json'))
    evals = sorted(runs_dir.glob('smoke/*/*/eval.json'))
    assert len(metas) == 5 and len(evals) == 5
    before = [m.read_text() for m in metas + evals]
    assert R.main(argv) == 0  # resumable: finished runs are neither retrained nor re-attacked
    assert [m.read_text() for m in metas + evals] == before

    # the runs folder gone (another machine): the report keeps every row from runs.csv
    table_before = (out / 'table.md').read_text()
    assert R.main(['--preset', 'smoke', '--report-only', '--runs-dir', str(tmp_path / 'gone'),
                   '--results-dir', str(results_dir), '--methods', 'erm']) == 0
    assert {r['run'] for r in csv.DictReader(open(out / 'runs.csv', newline=''))} == set(rows)
    assert (out / 'table.md').read_text().split('## The paper')[0] == table_before.split('## The paper')[0]


def test_paper_numbers_agree_with_the_robustness_benchmark():
    robustness = pytest.importorskip('benchmarks.robustness')
    names = dict(ERM='erm', Dropout='dropout', LS='ls', MixUp='mixup', ALPS='alps')
    metrics = {'clean': 'clean', 'fgsm': 'white-box/fgsm', 'pgd': 'white-box/pgd', 'bb_fgsm': 'black-box/fgsm',
               'bb_pgd': 'black-box/pgd'}
    for dataset, table in robustness.PAPER_FIGURES.items():
        for key, per_method in table.items():
            for method, value in per_method.items():
                assert paper_error(dataset, 'preact_resnet18', names[method], metrics[key])[0] == value


def test_preset_subsets_and_extra_train_args(tmp_path):
    preset = R.get_preset('paper', methods=['alps', 'erm'], models=['preact_resnet18'], datasets=['cifar10'],
                          seeds=[0], train_args=['--torchcompile'])
    runs = R.plan_runs(preset, tmp_path)
    assert [(r.dataset, r.model, r.name) for r in runs] == [('cifar10', 'preact_resnet18', 'erm-s0'),
                                                           ('cifar10', 'preact_resnet18', 'alps-s0')]
    assert '--torchcompile' in R.train_command(runs[0], preset, '/d', 'wds/cifar10')
    with pytest.raises(ValueError, match='no model'):
        R.get_preset('cpu', models=['resnet50'])  # a timm model, but not of the CIFAR family
    # any CIFAR model timm_alps.models registers with timm, with no list to update here
    assert R.get_preset('cpu-converged', models=['vgg16_cifar', 'preact_resnet18_w32'])['models'] == (
        'vgg16_cifar', 'preact_resnet18_w32')
    with pytest.raises(ValueError, match='no dataset'):
        R.get_preset('cpu', datasets=['cifar100'])


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert R.main(['--preset', 'cpu', '--data', str(tmp_path / 'nope.npz'), '--runs-dir', str(tmp_path)]) == 2
    assert 'does not exist' in capsys.readouterr().err


def test_goal_checks_say_when_a_difference_is_noise():
    rows = [dict(group='g', method=m, tag='', values={'clean': [c], 'white-box/fgsm': [f], 'white-box/pgd': [p]})
            for m, c, f, p in (('erm', 10, 50, 70), ('mixup', 9, 45, 80), ('alps', 9.5, 49, 60))]
    lines = R.goal_checks(rows, {'clean': 10000, 'white-box/fgsm': 500, 'white-box/pgd': 500})
    fgsm_erm = next(line for line in lines if 'FGSM white error < ERM' in line)
    assert '**yes**' in fgsm_erm and 'within noise' in fgsm_erm  # 49 vs 50 on 500 images
    pgd_mixup = next(line for line in lines if 'PGD-10 white error < MixUp' in line)
    assert 'beyond noise' in pgd_mixup  # 60 vs 80


def test_goal_checks_count_the_spread_over_seeds_when_both_methods_have_two():
    def check(mixup, alps):
        rows = [dict(group='g', method='mixup', tag='', values={'clean': mixup}),
                dict(group='g', method='alps', tag='', values={'clean': alps})]
        line, = [x for x in R.goal_checks(rows, {'clean': 10000}) if 'ALPS clean error <= MixUp' in x]
        return line
    # 1.5 points apart: beyond the test-sample noise alone (2 SE = 0.86 on 10000 images)...
    one = check([11.0], [9.5])
    assert '**yes**' in one
    assert 'beyond noise: 2 SE = 0.86 on 10000 images; test sample only, a method has one seed' in one
    # ...but not when each method's two seeds are 2 points apart (Welch: + 2/2 + 2/2 on the variance)
    spread = check([10.0, 12.0], [8.5, 10.5])
    assert '(9.50 <= 11.00' in spread and 'within noise: 2 SE = 2.96 on 10000 images and 2 + 2 seeds' in spread
    # tight seeds keep it beyond noise
    tight = check([10.9, 11.1], [9.4, 9.6])
    assert 'beyond noise: 2 SE = 0.90 on 10000 images and 2 + 2 seeds' in tight


def test_eps_table_averages_seeds():
    recs = [dict(group='g', tag='', method='erm', pgd_curve={0.0: 20.0, 1.0: 60.0}),
            dict(group='g', tag='', method='erm', pgd_curve={0.0: 22.0, 1.0: 70.0}),
            dict(group='g', tag='', method='alps', pgd_curve={0.0: 21.0, 1.0: 50.0})]
    text = '\n'.join(R.eps_table(recs))
    assert '| ERM | 2 | 21.00 ± 1.41 | 65.00 ± 7.07 |' in text
    assert '| ALPS | 1 | 21.00 | 50.00 |' in text


def _record(run, method, seed, status='finished', **metrics):
    return dict(group='cifar10-preact_resnet18_w16', dataset='cifar10', model='preact_resnet18_w16', method=method,
                tag='', seed=seed, run=run, status=status, epochs=1, epochs_done=1,
                command=f'python train_timm.py --seed {seed}',
                invocations=['python -m benchmarks.reproduce --preset smoke'], machine='CPU test', **metrics)


def test_table_is_regenerated_from_runs_csv_and_keeps_rows_whose_runs_are_gone(tmp_path, capsys):
    """runs.csv is the record: runs not on disk keep their rows; a run on disk replaces only its own row, and only
    when it has come as far and measured as much."""
    out = tmp_path / 'results' / 'smoke'
    paths = report.result_paths(out)
    full = {'clean': 10.0, 'white-box/fgsm': 50.0, 'white-box/pgd': 70.0}
    committed = [_record('erm-s0', 'erm', 0, **full), _record('ls-s0', 'ls', 0, **dict(full, clean=11.0)),
                 _record('alps-s0', 'alps', 0, **dict(full, clean=9.0, **{'white-box/pgd': 60.0}),
                         alps_eps=0.3, alps_beta='8 2', pgd_curve={'0': 9.0, '8': 99.0}, curve=[[1, 9.0, 1.5]])]
    out.mkdir(parents=True)
    report.write_runs_csv(committed, paths['runs_csv'])
    back = report.read_runs_csv(paths['runs_csv'])
    assert back == [{k: v for k, v in r.items() if v != ''} for r in committed]  # every field survives the file
    # the training time and speed are whole numbers; a file that spells them '4717.0' is written back as '4717'
    timed = paths['runs_csv'].with_name('timed.csv')
    timed.write_text('group,method,run,status,epochs,train_seconds,train_img_per_sec\n'
                     'g,erm,erm-s0,finished,1,4717.0,646\n')
    report.write_runs_csv(report.read_runs_csv(timed), timed)
    assert ',4717,646,' in timed.read_text()

    # planned runs: erm-s0 retrained without evaluation (fewer results), mixup-s0 new, ls-s0 not on disk
    collected = [_record('erm-s0', 'erm', 0, clean=10.5), _record('mixup-s0', 'mixup', 0, **dict(full, clean=9.5)),
                 _record('ls-s0', 'ls', 0, status='missing')]
    merged = report.merge(back, collected)
    by = {r['run']: r for r in merged}
    assert set(by) == {'erm-s0', 'ls-s0', 'alps-s0', 'mixup-s0'}
    assert by['erm-s0']['white-box/pgd'] == 70.0 and by['ls-s0']['clean'] == 11.0  # kept as recorded
    assert 'kept the recorded row' in capsys.readouterr().out
    evaluated = report.merge(merged, [_record('erm-s0', 'erm', 0, **dict(full, clean=10.5))])
    assert next(r for r in evaluated if r['run'] == 'erm-s0')['clean'] == 10.5  # as much measured: replaced

    preset = R.get_preset('smoke')
    report.write_results(merged, preset, paths, 'python -m benchmarks.reproduce --preset smoke', {'cifar10': 'x'})
    table = paths['md'].read_text()
    for label in ('| ERM | 1/1 | 10.00', '| Label smoothing | 1/1 | 11.00', '| MixUp | 1/1 | 9.50',
                  '| ALPS | 1/1 | 9.00'):
        assert label in table, label
    assert 'ALPS clean error <= MixUp: **yes** (9.00 <= 9.50' in table
    assert 'not recorded in runs.csv for cifar10-preact_resnet18_w16: erm-s0, ls-s0, mixup-s0' in table
    assert 'python train_timm.py --seed 0' in paths['commands_md'].read_text()
    assert {r['run'] for r in report.read_runs_csv(paths['runs_csv'])} == set(by)


def test_report_only_on_a_fresh_machine_keeps_the_committed_rows(tmp_path):
    results = tmp_path / 'results'
    paths = report.result_paths(results / 'smoke')
    paths['dir'].mkdir(parents=True)
    report.write_runs_csv([_record(f'{m}-s0', m, 0, clean=c) for m, c in (('erm', 10.0), ('alps', 9.0))],
                          paths['runs_csv'])
    argv = ['--preset', 'smoke', '--report-only', '--runs-dir', str(tmp_path / 'runs'), '--results-dir', str(results)]
    assert R.main(argv + ['--methods', 'ls']) == 0
    rows = {r['run']: r for r in report.read_runs_csv(paths['runs_csv'])}
    assert rows['erm-s0']['clean'] == 10.0 and rows['alps-s0']['clean'] == 9.0 and rows['ls-s0']['status'] == 'missing'
    assert '| ERM | 1/1 | 10.00' in paths['md'].read_text() and not (tmp_path / 'runs').exists()


def test_a_table_of_another_epoch_budget_is_not_mixed_in(tmp_path, capsys):
    paths = report.result_paths(tmp_path / 'smoke')
    paths['dir'].mkdir()
    report.write_runs_csv([_record('erm-s0', 'erm', 0, clean=10.0)], paths['runs_csv'])
    before = paths['runs_csv'].read_text()
    assert R.main(['--preset', 'smoke', '--epochs', '2', '--report-only', '--results-dir', str(tmp_path),
                   '--runs-dir', str(tmp_path / 'runs')]) == 2
    assert 'records runs of 1 epochs, not 2' in capsys.readouterr().err
    assert paths['runs_csv'].read_text() == before


def test_a_runs_csv_of_the_earlier_format_is_refused(tmp_path, capsys):
    out = tmp_path / 'smoke'
    out.mkdir()
    (out / 'runs.csv').write_text('group,run,status,epochs_done,train_seconds,train_img_per_sec,eval_seconds,'
                                  'clean_error\ng,erm-s0,finished,1,1,1,1,10.0\n')
    assert R.main(['--preset', 'smoke', '--report-only', '--results-dir', str(tmp_path),
                   '--runs-dir', str(tmp_path / 'runs')]) == 2
    assert 'earlier runs.csv format' in capsys.readouterr().err
    assert (out / 'runs.csv').read_text().startswith('group,run,status')  # untouched


def test_committed_results_regenerate_from_their_runs_csv(tmp_path):
    """The committed cpu-converged folder without its runs: the same table, claims and training commands."""
    src = R.REPO / 'benchmarks' / 'results' / 'cpu-converged'
    out = tmp_path / 'cpu-converged'
    out.mkdir()
    for name in ('runs.csv', 'curves.png', 'eps.png'):
        (out / name).write_bytes((src / name).read_bytes())
    records = report.merge(report.read_runs_csv(out / 'runs.csv'), [])
    report.write_results(records, R.get_preset('cpu-converged'), report.result_paths(out), 'x', {})
    new, old = (out / 'table.md').read_text(), (src / 'table.md').read_text()
    assert new == old
    assert (out / 'table.csv').read_text() == (src / 'table.csv').read_text()
    assert (out / 'eps.png').read_bytes() == (src / 'eps.png').read_bytes()  # kept: per-run curves not recorded
    commands = [line for line in (src / 'commands.md').read_text().splitlines() if 'train_timm.py' in line]
    assert [line for line in (out / 'commands.md').read_text().splitlines() if 'train_timm.py' in line] == commands
    # the machine record is the runs' (one thread each), whatever threads the writing process has
    env = json.loads((out / 'environment.json').read_text())
    assert env['run_machines'] == ['CPU AMD EPYC, 2 cores, 1 torch threads'] and 'torch_threads' not in env


def test_training_commands_match_the_committed_ones():
    """The runner generates the recorded training commands of the committed runs (paths aside), of every model in
    the table, except that the paper's ALPS now names --alps-eps-warmup-epochs 0: train_timm.py's default became the
    eps ramp after the first PreActResNet runs."""
    recorded = [line.split() for line in
                (R.REPO / 'benchmarks/results/cpu-converged/commands.md').read_text().splitlines()
                if 'train_timm.py' in line]
    preset = R.get_preset('cpu-converged', methods=R.METHODS, models=('preact_resnet18_w16', 'vgg16_cifar_w24'))
    runs = {(r.model, r.name): r for r in R.plan_runs(preset, Path('runs'))}
    names = {(tokens[tokens.index('--model') + 1], tokens[tokens.index('--experiment') + 1]) for tokens in recorded}
    assert {('preact_resnet18_w16', f'{m}-s{s}') for m in ('erm', 'mixup', 'alps', 'alps-ramp') for s in (0, 1)} \
        <= names, names
    assert ('vgg16_cifar_w24', 'alps-s0') in names
    for tokens in recorded:
        run = runs[tokens[tokens.index('--model') + 1], tokens[tokens.index('--experiment') + 1]]
        new = R.recipe(R.train_command(run, preset, '/d', 'wds/cifar10'))
        if run.method == 'alps' and '--alps-eps-warmup-epochs' not in tokens:
            i = new.index('--alps-eps-warmup-epochs')
            del new[i:i + 2]
        assert new == R.recipe(tokens), (run.model, run.name)


def test_cpu_converged_sweep_eps_plans_alps_at_each_radius(tmp_path, capsys):
    preset = R.get_preset('cpu-converged')
    runs = R.plan_runs(preset, tmp_path, 'eps=0.1,1.0')
    assert [r.name for r in runs] == ['alps-eps0.1-s0', 'alps-eps1-s0', 'alps-eps0.1-s1', 'alps-eps1-s1']
    cmd = ' '.join(R.train_command(runs[1], preset, '/d', 'wds/cifar10'))
    assert '--method alps --alps-eps-warmup-epochs 0 --alps-eps 1 --alps-beta 8 2' in cmd
    assert R.main(['--preset', 'cpu-converged', '--sweep', 'eps=0.1,1.0', '--dry-run', '--runs-dir',
                   str(tmp_path / 'runs'), '--data', str(tmp_path / 'c.npz')]) == 0
    assert capsys.readouterr().out.count('train_timm.py') == 4
    assert report.result_paths(tmp_path, 'eps')['runs_csv'].name == 'sweep-eps-runs.csv'


@pytest.mark.parametrize('train_arg, named', [('--momentun=0.9', 'momentun'), ('--drop=1.5', '--drop'),
                                               ('--alps-eps=abc', '--alps-eps')])
def test_a_command_train_timm_refuses_stops_the_runner_before_any_run(tmp_path, capsys, train_arg, named):
    runs_dir = tmp_path / 'runs'
    rc = R.main(['--preset', 'smoke', '--methods', 'erm,alps', '--runs-dir', str(runs_dir),
                 '--results-dir', str(tmp_path / 'results'), f'--train-arg={train_arg}'])
    err = capsys.readouterr().err
    assert rc == 2 and 'train_timm.py refuses the command' in err and named in err, err
    assert not list(runs_dir.glob('smoke/*/*')) and not (tmp_path / 'results').exists()


@pytest.mark.parametrize('argv, message', [
    (['--seeds', '0,0'], "lists 0 more than once"), (['--methods', 'erm,alps,erm'], 'lists erm more than once'),
    (['--models', 'preact_resnet18_w16,preact_resnet18_w16'], 'more than once'), (['--seeds', ','], 'names nothing'),
    (['--methods', ''], 'names nothing'), (['--datasets', ' , '], 'names nothing'),
    (['--data', 'a.npz', '--data', 'cifar10=b.npz'], 'gives cifar10 twice'),
    (['--sweep', 'eps=0.1,0.10'], 'same setting more than once'), (['--sweep', 'beta=0.8,5:2'], 'more than once')])
def test_a_list_option_naming_nothing_or_a_value_twice_is_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if argv[0] in ('--seeds', '--methods', '--models', '--datasets') \
            else contextlib.nullcontext():
        rc = R.main(['--preset', 'smoke', '--dry-run', '--runs-dir', str(tmp_path / 'runs'),
                     '--results-dir', str(tmp_path / 'results'), *argv])
        assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('train_arg, flag', [('--epochs=5', '--epochs'), ('--seed 3', '--seed'),
                                             ('--model resnet18', '--model'), ('--alps-eps 0.1', '--alps-eps'),
                                             ('--experiment x', '--experiment'), ('--max-train-samples 64',
                                                                                  '--max-train-samples')])
def test_a_train_arg_that_changes_what_the_runner_decides_is_refused(tmp_path, capsys, train_arg, flag):
    """The plan, the resume and the table are keyed on these: refused before anything is written."""
    assert R.main(['--preset', 'smoke', '--methods', 'alps', '--runs-dir', str(tmp_path / 'runs'),
                   '--results-dir', str(tmp_path / 'results'), f'--train-arg={train_arg}']) == 2
    err = capsys.readouterr().err
    assert f'--train-arg changes {flag} (' in err and 'which the runner decides: use' in err, err
    assert not (tmp_path / 'runs').exists()


def test_a_train_arg_may_vary_the_recipe_as_the_committed_warmup_study_did(tmp_path, capsys):
    assert R.main(['--preset', 'smoke', '--methods', 'erm', '--dry-run', '--runs-dir', str(tmp_path / 'runs'),
                   '--train-arg=--warmup-epochs=1', '--train-arg=--sched-on-updates',
                   '--train-arg=--no-channels-last', '--train-arg=--torchcompile']) == 0
    out = capsys.readouterr().out
    assert '--channels-last --warmup-epochs=1 --sched-on-updates --no-channels-last --torchcompile' in out


def test_results_of_an_earlier_evaluation_protocol_are_not_rewritten(tmp_path, capsys):
    """The committed `cpu` tables were evaluated with an earlier protocol: a report would describe the current one."""
    out = tmp_path / 'cpu'
    out.mkdir()
    src = R.REPO / 'benchmarks' / 'results' / 'cpu'
    for name in ('runs.csv', 'table.md'):
        (out / name).write_bytes((src / name).read_bytes())
    assert R.main(['--preset', 'cpu', '--report-only', '--results-dir', str(tmp_path),
                   '--runs-dir', str(tmp_path / 'runs'), '--data', str(tmp_path / 'c.npz')]) == 2
    assert 'earlier protocol (1)' in capsys.readouterr().err
    assert (out / 'table.md').read_bytes() == (src / 'table.md').read_bytes()
