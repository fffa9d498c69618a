"""Tests for `python -m benchmarks.robustness`: outputs, table layout, paper figures, one-pass black-box, bad input."""
import argparse
import os
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from benchmarks import robustness as bench
from timm_alps.attacks import fgsm, load_checkpoint_model

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


class _TinyCliNet(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)
        self.pretrained_cfg = {'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25), 'input_size': (3, 8, 8)}

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


@register_model
def robustness_cli_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    return _TinyCliNet(**kwargs)


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    # colours 0.04 apart in a noise of 0.12: clean error ~0, but 2/255-8/255 attacks flip 10-70% of the images
    colours = 0.5 + 0.04 * torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]])
    x = colours[labels][:, :, None, None] + 0.12 * torch.randn(n, 3, 8, 8, generator=g)
    return x.clamp(0, 1), labels


def _checkpoint(path: Path, seed: int, steps: int, num_classes: int = NUM_CLASSES, method=None) -> Path:
    torch.manual_seed(seed)
    model = robustness_cli_tiny(num_classes=num_classes)
    x, y = _data(96, seed=100 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model((x - 0.5) / 0.25), y % num_classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    args = argparse.Namespace(model='robustness_cli_tiny', num_classes=num_classes, model_kwargs={}, mean=None,
                              std=None, in_chans=None, gp=None)
    if method is not None:
        args.method = method
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': model.state_dict(), 'args': args, 'arch': 'robustness_cli_tiny', 'epoch': 1}, path)
    return path


def _npz(path: Path, n: int = 30) -> Path:
    x, y = _data(n, seed=7)
    np.savez(path, x_test=(x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), y_test=y.numpy())
    return path


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('robustness')
    return {
        'erm': _checkpoint(root / 'erm' / 'model_best.pth.tar', seed=0, steps=40),
        'alps': _checkpoint(root / 'run3' / 'last.pth.tar', seed=1, steps=40, method='alps'),
        'source': _checkpoint(root / 'erm_seed2' / 'model_best.pth.tar', seed=2, steps=40),
        'ten': _checkpoint(root / 'ten' / 'model_best.pth.tar', seed=3, steps=2, num_classes=10),
        'npz': _npz(root / 'data.npz'),
        'root': root,
    }


FAST = ['--apgd-steps', '4', '--unbounded-steps', '30', '--unbounded-step-size', '0.05',
        '--batch-size', '16', '--no-progress']


def _read_csv(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_writes_tables_like_the_paper(files, capsys):
    out = files['root'] / 'out'
    argv = [str(files['erm']), str(files['alps']), '--source', str(files['source']), '--npz', str(files['npz']),
            '--eps', '2/255', '4/255', '8/255', '--paper', 'cifar10', '--output', str(out)] + FAST
    paths = bench.main(argv)
    assert {p.name for p in out.iterdir()} >= {'robustness.md', 'robustness.csv', 'robustness.png'}
    assert paths['png'].stat().st_size > 1000

    rows = _read_csv(paths['csv'])
    assert [(r['method'], r['eps_label']) for r in rows] == [
        (m, e) for m in ('erm', 'alps') for e in ('2/255', '4/255', '8/255')]
    for r in rows:
        assert r['num_samples'] == '30'
        for key in ('clean', 'fgsm', 'bb_fgsm', 'pgd', 'bb_pgd', 'apgd'):
            assert 0.0 <= float(r[f'{key}_err']) <= 100.0
        assert r['gradient_masking'] in ('true', 'false')
    # errors grow with eps for a fixed method and attack (same examples, larger ball, keep-best PGD)
    erm = [r for r in rows if r['method'] == 'erm']
    assert float(erm[0]['pgd_err']) <= float(erm[2]['pgd_err'])

    # paper figures: only at 4/255, matched by name (folder 'erm', args.method 'alps')
    by = {(r['method'], r['eps_label']): r for r in rows}
    assert by['erm', '4/255']['paper_fgsm_err'] == '39.02' and by['erm', '4/255']['paper_bb_pgd_err'] == '15.98'
    assert by['alps', '4/255']['paper_pgd_err'] == '44.55' and by['alps', '4/255']['paper_clean_err'] == '4.15'
    assert by['alps', '8/255']['paper_fgsm_err'] == ''

    md = paths['md'].read_text()
    assert '## eps = 4/255 (the paper\'s setting, Tables 5-6)' in md
    assert '| Method | Clean | FGSM white-box | FGSM black-box | PGD-10 white-box | PGD-10 black-box | ' \
           'APGD-CE white-box |' in md
    assert '(24.00)' in md and '(8.55)' in md and 'erm_seed2' in md
    assert 'Unbounded PGD sanity check' in md
    assert 'python -m benchmarks.robustness' in md and '--npz' in md
    assert 'Robustness benchmark' in capsys.readouterr().out


def test_cli_numbers_match_direct_evaluation(files):
    out = files['root'] / 'direct'
    bench.main([str(files['erm']), '--names', 'mine', '--source', str(files['source']), '--npz', str(files['npz']),
                '--eps', '8/255', '--attacks', 'fgsm', '--paper', 'none', '--output', str(out)] + FAST)
    row, = _read_csv(out / 'robustness.csv')
    model = load_checkpoint_model(files['erm'])
    source = load_checkpoint_model(files['source'])
    data = np.load(files['npz'])
    x = torch.from_numpy(data['x_test']).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data['y_test']).long()

    def err(images):
        with torch.no_grad():
            return f'{100 * (model(images).argmax(1) != y).float().mean().item():.2f}'

    assert row['method'] == 'mine'
    assert row['clean_err'] == err(x)
    assert row['fgsm_err'] == err(fgsm(model, x, y, 8 / 255))
    assert row['bb_fgsm_err'] == err(fgsm(source, x, y, 8 / 255))  # crafted on the source, not the model
    assert row['pgd_err'] == '' and row['unbounded_acc'] == '' and row['paper_clean_err'] == ''


def test_eval_subset_is_the_data_modules_seeded_balanced_draw():
    from timm_alps.data import subset_indices
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2, 1, 0, 2])
    keep = bench.eval_subset(labels, 6, seed=3)
    assert torch.bincount(labels[keep], minlength=3).tolist() == [2, 2, 2]
    assert keep.tolist() == sorted(keep.tolist()) == subset_indices(10, 6, 3, labels=labels).tolist()


def test_reproduce_evaluates_the_subsets_this_cli_evaluates(files):
    """One protocol: `reproduce.eval_batches(src, N)` yields the images `--max-samples N` evaluates."""
    from benchmarks import reproduce
    from timm_alps.data import BUNDLED_DATA_DIR
    args = bench.build_parser().parse_args([str(files['ten']), '--max-samples', '40'])
    images, labels, _ = bench.load_data(args)
    x, y = next(iter(reproduce.eval_batches(str(BUNDLED_DATA_DIR), 40, 1000, 'cpu')))
    assert torch.equal(y, labels) and torch.equal(x, images.float() / 255)


def test_max_samples_class_balanced(files):
    out = files['root'] / 'subset'
    bench.main([str(files['erm']), '--npz', str(files['npz']), '--max-samples', '7', '--eps', '4/255',
                '--attacks', 'fgsm', 'pgd', '--pgd-steps', '3', '--paper', 'cifar10', '--source', str(files['erm']),
                '--output', str(out)] + FAST)
    row, = _read_csv(out / 'robustness.csv')
    assert row['num_samples'] == '7'
    md = (out / 'robustness.md').read_text()
    assert 'first 7 class-balanced of a seeded shuffle (seed 0' in md and 'PGD-3 white-box' in md
    # the source evaluated as a target: its black-box cells are white-box, and are flagged so
    assert row['bb_fgsm_err'] == row['fgsm_err'] and '(source)' in md and 'left out of the bold ranking' in md
    # PGD-3 is not the paper's protocol: its PGD figures are left out, FGSM's stay
    assert row['paper_pgd_err'] == '' and row['paper_bb_pgd_err'] == '' and row['paper_fgsm_err'] == '39.02'


@pytest.mark.parametrize('name,expected', [
    ('alps', 'ALPS'), ('cifar10-alps-s1', 'ALPS'), ('mixup', 'MixUp'), ('label_smoothing', 'LS'), ('ls', 'LS'),
    ('dropout', 'Dropout'), ('erm', 'ERM'), ('ERM_seed2', 'ERM'), ('20250101-120000-preact_resnet18-32', None),
    ('else', None)])
def test_paper_method(name, expected):
    assert bench.paper_method(name) == expected


def test_parse_eps():
    assert bench.parse_eps('4/255') == pytest.approx(4 / 255)
    assert bench.parse_eps('0.03') == pytest.approx(0.03)
    assert bench.eps_label(4 / 255) == '4/255' and bench.eps_label(0.03) == '0.03'
    for bad in ('-1/255', 'abc', 'inf', '1/0'):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_eps(bad)


def _fails(argv, capsys, match: str):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_bad_input(files, capsys, tmp_path):
    base = ['--npz', str(files['npz']), '--output', str(tmp_path), '--attacks', 'fgsm'] + FAST
    erm = str(files['erm'])
    _fails([erm, '--eps=-4/255'] + base, capsys, 'eps must be >= 0')
    _fails([erm, '--eps', '4/255', '-0.01'] + base, capsys, 'eps must be >= 0')
    _fails([erm, '--num-classes', '10'] + base, capsys, 'num_classes=10')
    _fails([erm, '--model', 'test_resnet'] + base, capsys, "does not match model 'test_resnet'")
    _fails([erm, '--source', str(files['ten'])] + base, capsys, 'number of classes')
    _fails([str(files['ten']), erm] + base, capsys, 'number of classes')
    _fails([str(tmp_path / 'missing.pth.tar')] + base, capsys, 'does not exist')
    _fails([erm, erm] + base, capsys, 'not unique')
    _fails([erm, '--names', 'a', 'b'] + base, capsys, '--names gives 2 names for 1 checkpoints')
    empty = tmp_path / 'empty.npz'
    np.savez(empty, x_test=np.zeros((0, 8, 8, 3), np.uint8), y_test=np.zeros((0,), np.int64))
    _fails([erm, '--npz', str(empty), '--output', str(tmp_path)] + FAST, capsys, 'empty')
    wide = tmp_path / 'wide.npz'
    np.savez(wide, x_test=np.zeros((4, 8, 8, 3), np.uint8), y_test=np.array([0, 1, 2, 7]))
    _fails([erm, '--npz', str(wide), '--output', str(tmp_path)] + FAST, capsys, 'labels must lie in [0, 2]')
    _fails([erm, '--split', 'nosuch'] + base, capsys, 'nosuch')


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, '-m', 'benchmarks.robustness', '--help'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '--source' in done.stdout and '--eps' in done.stdout and '--max-samples' in done.stdout


def test_bundled_data_default_and_timm_wds_reader_agree(files):
    """No data flag: the bundled CIFAR-10 test subset; `--dataset wds/...` reads the same shards through timm."""
    from timm_alps.data import BUNDLED_DATA_DIR
    common = [str(files['ten']), '--max-samples', '20', '--eps', '4/255', '--attacks', 'fgsm'] + FAST
    bench.main(common + ['--output', str(files['root'] / 'bundled')])
    bench.main(common + ['--dataset', 'wds/cifar10_subset', '--data-root', str(BUNDLED_DATA_DIR),
                         '--output', str(files['root'] / 'wds')])
    a, = _read_csv(files['root'] / 'bundled' / 'robustness.csv')
    b, = _read_csv(files['root'] / 'wds' / 'robustness.csv')
    assert a['num_samples'] == b['num_samples'] == '20'
    assert (a['clean_err'], a['fgsm_err']) == (b['clean_err'], b['fgsm_err'])
    assert 'bundled CIFAR-10 subset split \'test\'' in (files['root'] / 'bundled' / 'robustness.md').read_text()


AA_FAST = ['--autoattack-steps', '3', '--autoattack-queries', '20']


def test_cli_autoattack_report_json_table_plot(files):
    pytest.importorskip('torchattacks')
    import json
    out = files['root'] / 'aa'
    argv = [str(files['ten']), '--names', 'erm', '--max-samples', '20', '--eps', '4/255', '8/255',
            '--attacks', 'fgsm', 'autoattack', 'unbounded', '--output', str(out)] + FAST + AA_FAST
    paths = bench.main(argv)
    doc = json.loads(paths['json'].read_text())
    model, = doc['models']
    rows = {r['eps_label']: r for r in _read_csv(paths['csv'])}
    # RobustBench fields at 8/255, and every other attack per eps
    assert (model['eps_label'], model['threat_model'], model['n_examples']) == ('8/255', 'Linf', 20)
    assert model['eps'] == 8 / 255
    assert model['clean_acc'] == pytest.approx(100 - float(rows['8/255']['clean_err']))
    assert model['autoattack_acc'] == pytest.approx(100 - float(rows['8/255']['autoattack_err']))
    assert model['checkpoint'] == str(files['ten']) and 'autoattack' in doc['command']
    assert set(model['flags']) == {'randomized', 'zero_gradients', 'square_stronger', 'gradient_masking_unbounded_pgd'}
    by_eps = {r['eps_label']: r for r in model['results']}
    assert by_eps['4/255']['fgsm_acc'] == pytest.approx(100 - float(rows['4/255']['fgsm_err']))
    after = by_eps['8/255']['autoattack_acc_after']
    assert list(after) == ['apgd-ce', 'apgd-t', 'fab-t', 'square'] and after['square'] == model['autoattack_acc']
    assert doc['autoattack']['version'] == 'custom'  # 3 iterations: not the standard version, and it says so
    md = paths['md'].read_text()
    assert 'AutoAttack white-box' in md and 'NOT the standard version' in md and 'Square stronger' in md
    assert paths['png'].stat().st_size > 1000


def test_bad_input_of_every_kind(files, capsys, tmp_path):
    base = ['--npz', str(files['npz']), '--output', str(tmp_path), '--attacks', 'fgsm'] + FAST
    erm = str(files['erm'])
    _fails([erm, '--eps', '4'] + base, capsys, 'did you mean 4/255')
    _fails([erm, '--eps', 'nan'] + base, capsys, 'eps must be >= 0 and <= 1')
    _fails([erm, '--eps', '4/255', '4/255'] + base, capsys, 'twice')
    for flag, value, match in (('--pgd-step-ratio', 'nan', '--pgd-step-ratio'), ('--pgd-step-ratio', 'inf', 'finite'),
                               ('--unbounded-step-size', '-1', '--unbounded-step-size'),
                               ('--masking-threshold', '150', '--masking-threshold'),
                               ('--masking-threshold', 'nan', '--masking-threshold'),
                               ('--seed', '-3', '--seed'), ('--max-samples', '0', '--max-samples'),
                               ('--num-classes', '0', '--num-classes'), ('--batch-size', '0', '--batch-size'),
                               ('--autoattack-queries', '0', '--autoattack-queries'),
                               ('--device', 'warp9', "--device 'warp9'"), ('--device', 'cuda:99', '--device')):
        if flag == '--device' and value == 'cuda:99' and torch.cuda.device_count() > 99:
            continue
        _fails([erm] + base + [flag, value], capsys, match)
    if not torch.cuda.is_available():
        _fails([erm, '--device', 'cuda'] + base, capsys, 'no cuda device is available')
    _fails([erm, '--norm', 'L2', '--attacks', 'fgsm', 'autoattack'] + base[:4] + FAST, capsys,
           '--norm L2 applies to AutoAttack only')
    # a file that is not a checkpoint, whatever its bytes
    for i, content in enumerate((b'e' * 100, b'hello world', b'')):
        bad = tmp_path / f'notes{i}.pth.tar'
        bad.write_bytes(content)
        _fails([str(bad)] + base, capsys, 'cannot read checkpoint')
    # data files that are not data
    text = tmp_path / 'text.npz'
    text.write_text('hello')
    _fails([erm, '--npz', str(text), '--attacks', 'fgsm', '--output', str(tmp_path)] + FAST, capsys, 'cannot be read')
    # a timm dataset that is not there
    _fails([erm, '--dataset', 'torch/cifar10', '--data-root', str(tmp_path), '--attacks', 'fgsm',
            '--output', str(tmp_path)] + FAST, capsys, "--dataset 'torch/cifar10'")
    _fails([erm, '--dataset', 'torch/cifar10', '--data-root', str(tmp_path / 'nowhere'), '--attacks', 'fgsm',
            '--output', str(tmp_path)] + FAST, capsys, 'does not exist')
    # AutoAttack's standard version needs 4 classes (APGD-T); the 3-class model is refused with the reason
    if pytest.importorskip('torchattacks'):
        _fails([erm, '--attacks', 'autoattack'] + base[:4] + FAST + AA_FAST, capsys, 'at least 4 classes')


def test_unwritable_output_is_refused_before_any_attack(files, capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, 'evaluate_robustness', lambda *a, **k: calls.append(1))
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    common = [str(files['erm']), '--npz', str(files['npz']), '--attacks', 'fgsm'] + FAST
    _fails(common + ['--output', str(blocker)], capsys, 'is a file')
    _fails(common + ['--output', str(blocker / 'sub')], capsys, 'cannot be written')
    if os.geteuid() != 0:
        locked = tmp_path / 'locked'
        locked.mkdir()
        locked.chmod(0o500)
        try:
            _fails(common + ['--output', str(locked / 'out')], capsys, 'cannot be written')
            _fails(common + ['--output', str(locked)], capsys, 'cannot be written')
        finally:
            locked.chmod(0o700)
    assert calls == []
