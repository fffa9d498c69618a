"""No run loses data or trains on less data silently: one run per output folder (a lock), a resume continues only its
own run, damaged shards stop both loaders naming the shard (or are counted under --tolerate-bad-shards), a full disk
says so and stays resumable, and the converter refuses label sets that would make mostly empty classes."""
import csv
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from timm_alps import train
from timm_alps.data import check_shards, convert
from timm_alps.train import TrainError

# A width-4 PreAct ResNet on 64 bundled images: about a second per epoch on one core.
TINY = ['--model', 'preact_resnet18_w16', '--model-kwargs', 'width=4', '--max-train-samples', '64',
        '--max-eval-samples', '32', '-b', '16', '--epochs', '1', '--no-progress', '-j', '0']


def _tree(path):
    """Every file under `path` with its bytes' hash (and the folder's listing): 'byte-for-byte untouched'."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, 'rb').read()).hexdigest() if os.path.isfile(p) \
                else 'dir'
    return out


def _rejected(argv, expected, exit_code=2):
    with pytest.raises(TrainError) as e:
        train.main(argv)
    assert e.value.exit_code == exit_code
    assert expected in str(e.value), str(e.value)
    assert '\n' not in str(e.value)
    return str(e.value)


# -- output folder: one run at a time, a resume only into its own run ------------------------------------------------
def test_a_folder_in_use_by_another_run_is_refused(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    fd = os.open(run, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running training holds
    try:
        _rejected(TINY + ['--output', str(tmp_path), '--experiment', 'run'], 'in use by another training run')
        assert os.listdir(run) == []
    finally:
        os.close(fd)
    assert train.main(TINY + ['--output', str(tmp_path), '--experiment', 'run']) == 0  # released: it runs


def test_two_runs_started_into_one_folder(tmp_path):
    """A real second process: the run holding the folder keeps it for its whole life; the other exits 2, one line."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    argv = TINY + ['--epochs', '50', '--output', str(tmp_path), '--experiment', 'run']
    first = subprocess.Popen([sys.executable, '-m', 'timm_alps.train'] + argv, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / 'run' / 'args.yaml').exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        second = subprocess.run([sys.executable, '-m', 'timm_alps.train'] + argv + ['--resume', 'auto'], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert [line for line in second.stderr.splitlines() if 'error' in line] == [
            f"timm-alps-train: error: output folder '{tmp_path / 'run'}' is in use by another training run; wait "
            f"for it to finish or pick another --experiment."]
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_resume_into_another_run_is_refused_unless_overwrite(tmp_path):
    common = TINY + ['--output', str(tmp_path)]
    assert train.main(common + ['--experiment', 'a', '--epochs', '2', '--seed', '1']) == 0
    assert train.main(common + ['--experiment', 'b', '--epochs', '2', '--seed', '2']) == 0
    b = _tree(tmp_path / 'b')
    a_ckpt = str(tmp_path / 'a' / 'checkpoint-0.pth.tar')
    for extra in ([], ['--epochs', '3']):
        _rejected(common + ['--resume', a_ckpt, '--experiment', 'b'] + extra, 'holds another run')
        assert _tree(tmp_path / 'b') == b  # byte for byte
    # its own run: continues; a new folder: a continuation of a, written there
    assert train.main(common + ['--resume', 'auto', '--experiment', 'b', '--epochs', '3']) == 0
    assert train.main(common + ['--resume', a_ckpt, '--experiment', 'c', '--epochs', '2']) == 0
    with open(tmp_path / 'c' / 'summary.csv', newline='') as f:
        assert [r['epoch'] for r in csv.DictReader(f)] == ['1']
    # --overwrite: b is replaced by the continuation of a (no mix of the two runs)
    assert train.main(common + ['--resume', a_ckpt, '--experiment', 'b', '--epochs', '2', '--overwrite']) == 0
    with open(tmp_path / 'b' / 'summary.csv', newline='') as f:
        assert [r['epoch'] for r in csv.DictReader(f)] == ['1']
    assert sorted(p.name for p in (tmp_path / 'b').glob('checkpoint-*')) == ['checkpoint-1.pth.tar']  # b's went


# -- shards -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """timm_alps shards of random 32x32 images, 3 classes: 3 train shards of 16, 2 test shards of 16."""
    root = tmp_path_factory.mktemp('shards')
    rng = np.random.default_rng(0)
    npz = root / 'tiny.npz'
    np.savez(npz, x_train=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), y_train=np.arange(48) % 3,
             x_test=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), y_test=np.arange(32) % 3)
    convert(npz, root / 'wds', shard_size=16)
    convert(npz, root / 'wds-gz', shard_size=16, compress=True)
    return root / 'wds'


def _damage(path, how):
    data = path.read_bytes()
    if how == 'missing':
        path.unlink()
    elif how == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    elif how == 'random-bytes':
        path.write_bytes(np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == 'empty':
        path.write_bytes(b'')
    elif how == 'bad-header':  # a member header in the middle garbled: tar reading stops early there
        path.write_bytes(data[:len(data) // 2] + b'\x07' * 512 + data[len(data) // 2 + 512:])


def _data_copy(shards, tmp_path):
    d = tmp_path / 'wds'
    shutil.copytree(shards, d)
    return d


def _data_args(d):
    return ['--data-dir', str(d), '--dataset', 'wds/tiny', '--model', 'preact_resnet18_w16', '--model-kwargs',
            'width=4', '-b', '16', '--epochs', '1', '--no-progress', '-j', '0']


@pytest.mark.parametrize('loader', ['fast', 'timm'])
@pytest.mark.parametrize('how, shard', [('missing', 'tiny-train-0001.tar'), ('truncated', 'tiny-train-0002.tar'),
                                        ('random-bytes', 'tiny-train-0000.tar'), ('empty', 'tiny-train-0001.tar'),
                                        ('bad-header', 'tiny-train-0001.tar'), ('truncated', 'tiny-test-0001.tar')])
def test_a_damaged_shard_stops_both_loaders_naming_it(shards, tmp_path, loader, how, shard):
    d = _data_copy(shards, tmp_path)
    _damage(d / shard, how)
    _rejected(_data_args(d) + ['--loader', loader, '--output', str(tmp_path), '--experiment', 'run'], shard)
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('loader', ['fast', 'timm'])
@pytest.mark.parametrize('how', ['truncated', 'random-bytes', 'bad-header'])
def test_a_damaged_gzip_shard_stops_both_loaders_naming_it(shards, tmp_path, loader, how):
    d = tmp_path / 'wds'
    shutil.copytree(shards.parent / 'wds-gz', d)
    _damage(d / 'tiny-train-0001.tar.gz', how)
    _rejected(_data_args(d) + ['--loader', loader, '--output', str(tmp_path), '--experiment', 'run'],
              'tiny-train-0001.tar.gz')
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('loader', ['fast', 'timm'])
def test_tolerate_bad_shards_trains_on_the_rest_and_counts_it(shards, tmp_path, loader):
    d = _data_copy(shards, tmp_path)
    _damage(d / 'tiny-train-0001.tar', 'missing')
    bad = check_shards(d, 'train')
    assert [(os.path.basename(b.path), b.lost) for b in bad] == [('tiny-train-0001.tar', 16)]
    argv = _data_args(d) + ['--loader', loader, '--output', str(tmp_path), '--experiment', 'run']
    assert train.main(argv + ['--tolerate-bad-shards']) == 0
    with open(tmp_path / 'run' / 'summary.csv', newline='') as f:
        row = next(csv.DictReader(f))
    assert (row['train_skipped_shards'], row['train_skipped_samples']) == ('1', '16')
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'tiny-train-0001.tar' in log and '1 damaged shard(s) (16 samples)' in log


def test_whole_shards_train_without_skip_columns(shards, tmp_path):
    assert check_shards(shards, 'train') == [] and check_shards(shards, 'test') == []
    assert train.main(_data_args(shards) + ['--output', str(tmp_path), '--experiment', 'run']) == 0
    with open(tmp_path / 'run' / 'summary.csv', newline='') as f:
        assert 'train_skipped_shards' not in next(csv.DictReader(f))


# -- -c files -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('content, expected', [
    (b'\x89PNG\r\n\x1a\n\x00\x00\xff\xfe', 'not a UTF-8 text file'),
    (b'model: null\n', '--model: null'),
    (b'epochs: null\n', '--epochs: null'),
    (b'lr: 0.1\nlr: 0.2\n', "'lr' is given twice"),
    (b'lr: 0.1\nlr-x: 0.2\n', "unknown key 'lr-x'"),
    (b'lr: 0.1\nmomentum: 0.9\nlr: 0.1\n', "'lr' is given twice"),
    (b'? [a, b]\n: 1\n', 'not a flag name'),
    (b'3: 1\n', 'unknown key 3'),
    (b'model: [a, b]\n', '--model: expected one value'),
    (b'lr: {a: 1}\n', '--lr: expected one value'),
    (b'model_kwargs: [1]\n', '--model-kwargs: expected a mapping'),
    (b'bce_loss: "yes"\n', '--bce-loss: expected true or false'),
    (b'epochs: true\n', '--epochs: expected a number, got True'),
    (b'alps_beta: [8, x]\n', "argument --alps-beta: invalid float value: 'x'"),
    (b'model_kwargs: {a=1: 2}\n', '--model-kwargs: expected a mapping'),
    (b'!!python/object:os.system\n', 'could not read --config'),
    (b'a: &x [1]\nb: *x\n', "unknown key 'a'"),
    (b'\t- lr\n', 'could not read --config'),
])
def test_every_bad_config_file_is_one_line(tmp_path, content, expected):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_bytes(content)
    _rejected(['-c', str(cfg), '--output', str(tmp_path), '--experiment', 'bad'], expected)
    assert not (tmp_path / 'bad').exists()


def test_a_config_folder_or_missing_file_is_one_line(tmp_path):
    _rejected(['-c', str(tmp_path)], 'could not read --config')
    _rejected(['-c', str(tmp_path / 'none.yaml')], 'could not read --config')


# -- a full disk ----------------------------------------------------------------------------------------------------------
def test_full_disk_says_so_and_the_run_resumes(tmp_path, monkeypatch):
    argv = TINY + ['--epochs', '2', '--output', str(tmp_path), '--experiment', 'run']
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):  # the second epoch's save finds the disk full, as torch's zip writer reports it
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 4416 vs 4306')
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, 'save', save)
    monkeypatch.setattr(train.run, '_free_bytes', lambda path: 0)
    message = _rejected(argv, 'no space left on the device', exit_code=1)
    assert 'enforce fail' not in message and '--resume auto --experiment run' in message
    monkeypatch.undo()
    assert train.main(argv + ['--resume', 'auto']) == 0
    with open(tmp_path / 'run' / 'summary.csv', newline='') as f:
        assert [r['epoch'] for r in csv.DictReader(f)] == ['0', '1']


def test_resume_auto_needs_no_room_for_the_files_it_replaces(tmp_path, monkeypatch):
    argv = TINY + ['--output', str(tmp_path)]
    assert train.main(argv + ['--experiment', 'run']) == 0
    one = os.path.getsize(tmp_path / 'run' / 'last.pth.tar')
    usage = shutil.disk_usage(tmp_path)
    # room for about 1.5 checkpoints: a new run (last + best + the temporary copy) does not fit, a resume does
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage._replace(free=int(1.5 * one)))
    _rejected(argv + ['--experiment', 'new'], 'MiB free')
    assert not (tmp_path / 'new').exists()
    assert train.main(argv + ['--experiment', 'run', '--resume', 'auto', '--epochs', '2']) == 0


# -- the converter ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('labels, ok', [([0, 1000000], False), ([0, 5], False), ([1, 7, 9], False),
                                        ([0, 1, 2, 4], True), ([0, 1, 3], True)])
def test_converter_refuses_mostly_empty_classes(tmp_path, labels, ok):
    y = np.array(labels * 2)
    npz = tmp_path / 'sparse.npz'
    np.savez(npz, x_train=np.zeros((len(y), 4, 4, 3), np.uint8), y_train=y)
    if ok:
        assert convert(npz, tmp_path / 'out')['num_classes'] == max(labels) + 1
        return
    with pytest.raises(ValueError, match='empty.*--num-classes'):
        convert(npz, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()
    if max(labels) < 100:  # an explicit count is the user's word
        assert convert(npz, tmp_path / 'out', num_classes=max(labels) + 1)['num_classes'] == max(labels) + 1
    with pytest.raises(ValueError, match='num_classes'):
        convert(npz, tmp_path / 'out2', num_classes=max(labels))


def test_converter_cli_refuses_in_one_line(tmp_path, capsys):
    from timm_alps.data import main
    npz = tmp_path / 'sparse.npz'
    np.savez(npz, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 1000000]))
    with pytest.raises(SystemExit) as e:
        main([str(npz), str(tmp_path / 'out')])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '1000001 classes' in err[0]
    np.savez(npz, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 5]))
    main([str(npz), str(tmp_path / 'out'), '--num-classes', '6'])
    assert 'classes (6)' in capsys.readouterr().out


@pytest.mark.parametrize('kind, message', [('garbage', 'cannot be read as an .npz archive (not a zip archive)'),
                                           ('truncated', 'cannot be read as an .npz archive (BadZipFile'),
                                           ('npy', 'holds a single array'), ('no_splits', 'has no x_<split> arrays')])
def test_converter_names_an_npz_that_is_not_one(tmp_path, capsys, kind, message):
    from timm_alps.data import main
    npz = tmp_path / 'data.npz'
    if kind == 'garbage':
        npz.write_bytes(b'not an archive at all')
    elif kind == 'npy':
        with open(npz, 'wb') as f:
            np.save(f, np.zeros(3))
    else:
        np.savez(npz, **({'a': np.zeros(3)} if kind == 'no_splits' else
                         dict(x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 1]))))
        if kind == 'truncated':
            npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        main([str(npz), str(tmp_path / 'out')])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'out').exists()
