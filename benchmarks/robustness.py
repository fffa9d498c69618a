""" Robustness benchmark: the ALPS paper's Tables 5-6 protocol plus APGD-CE, AutoAttack and a gradient-masking check

Top-1 test error (%) of each checkpoint, clean and under attacks in pixel space:
FGSM, PGD-10 (step eps/4, i.e. the paper's 1/255 at 4/255), APGD-CE (Croce & Hein, 2020), white-box (crafted on the
model itself) and black-box (crafted once on `--source`, the paper's ERM model, and shown to every model), for each
radius of the eps grid; AutoAttack's standard version (`--attacks ... autoattack`, L-inf or `--norm L2`; needs
`pip install "timm-alps[robustness]"`) with its sanity flags; plus accuracy under unbounded PGD (eps = inf, 200 steps
of 0.01), which must fall to ~0% unless gradients are masked. Writes robustness.md (tables laid out like the
paper's, its CIFAR figures alongside), robustness.csv (one row per method and eps), robustness.json (RobustBench-style
fields per model: clean_acc, autoattack_acc, eps, threat_model, n_examples, every attack's accuracy, the flags, the
checkpoint and the command) and robustness.png (error against eps per method).

    python -m benchmarks.robustness output/train/erm/model_best.pth.tar output/train/alps/model_best.pth.tar \\
        --source output/train/erm_seed1/model_best.pth.tar --output benchmarks/results/robustness

Data: the bundled CIFAR-10 test subset by default; `--data-dir` (shards from `python -m timm_alps.data`),
`--npz` (uint8 NHWC x_<split> / y_<split>), or `--dataset` (any timm dataset name such as `torch/cifar10` or
`wds/name`, with `--data-root`).
"""
import argparse
import csv
import json
import math
import os
import re
import shlex
import sys
import time
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks.machine import machine_line
from benchmarks.paper_numbers import PAPER_ERRORS
from timm_alps.attacks import (
    UNBOUNDED_MAX_ACCURACY, apgd_ce, evaluate_robustness, fgsm, gradient_masking_suspected, load_checkpoint_model,
    pgd, unbounded_pgd,
)
from timm_alps.autoattack import NORMS, STANDARD_ATTACKS, AutoAttack

ATTACKS = ('fgsm', 'pgd', 'apgd', 'autoattack', 'unbounded')
DEFAULT_ATTACKS = ('fgsm', 'pgd', 'apgd', 'unbounded')  # AutoAttack is opt-in: it costs minutes per 100 images on CPU
LINF_ONLY = ('fgsm', 'pgd', 'apgd')
ROBUSTBENCH_EPS = {'Linf': 8 / 255, 'L2': 0.5}  # the radius RobustBench reports on CIFAR
TRANSFERABLE = ('fgsm', 'pgd')  # the paper's black-box attacks
PAPER_EPS = 4 / 255

# The paper's mean test error (%) of PreActResNet18 (Tables 2-3 clean, Table 5 FGSM, Table 6 PGD), from the one
# copy of the published numbers in benchmarks.paper_numbers: {dataset: {column: {paper row: error}}}.
_PAPER_ROWS = {'ERM': 'erm', 'Dropout': 'dropout', 'LS': 'ls', 'MixUp': 'mixup', 'ALPS': 'alps'}
_PAPER_COLUMNS = {'clean': 'clean', 'fgsm': 'white-box/fgsm', 'bb_fgsm': 'black-box/fgsm', 'pgd': 'white-box/pgd',
                  'bb_pgd': 'black-box/pgd'}
PAPER_FIGURES: Dict[str, Dict[str, Dict[str, float]]] = {
    dataset: {column: {row: PAPER_ERRORS[(dataset, 'preact_resnet18')][method][metric][0]
                       for row, method in _PAPER_ROWS.items()}
              for column, metric in _PAPER_COLUMNS.items()}
    for dataset in ('cifar10', 'cifar100')
}
_PAPER_LABELS = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100'}

# CSV / table columns: key, header, setting prefix, attack
COLUMNS = (
    ('clean', 'Clean', None, None),
    ('fgsm', 'FGSM white-box', 'white-box', 'fgsm'),
    ('bb_fgsm', 'FGSM black-box', 'black-box', 'fgsm'),
    ('pgd', '{pgd} white-box', 'white-box', 'pgd'),
    ('bb_pgd', '{pgd} black-box', 'black-box', 'pgd'),
    ('apgd', 'APGD-CE white-box', 'white-box', 'apgd'),
    ('autoattack', 'AutoAttack white-box', 'white-box', 'autoattack'),
)


def parse_eps(text: str) -> float:
    """'4/255', '0.0157' or 'inf' -> float; a negative radius is an error."""
    try:
        value = float(Fraction(text)) if '/' in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f'eps {text!r} is not a number or a fraction like 4/255')
    if math.isinf(value) and value > 0:
        raise argparse.ArgumentTypeError('eps=inf belongs to the unbounded check (--attacks unbounded), not the grid')
    if not 0 <= value <= 1:  # also NaN
        hint = f'; did you mean {text}/255?' if 1 < value <= 255 else ''
        raise argparse.ArgumentTypeError(
            f'eps must be >= 0 and <= 1 (pixel units in [0, 1], e.g. 4/255), got {text!r}{hint}')
    return value


def eps_label(eps: float) -> str:
    levels = eps * 255
    return f'{round(levels)}/255' if abs(levels - round(levels)) < 1e-6 else f'{eps:.4g}'


def paper_method(name: str) -> Optional[str]:
    """Map a method name (e.g. 'alps', 'cifar10-mixup-s1', 'label_smoothing') to the paper's row, if any."""
    tokens = [t for t in re.split(r'[^a-z0-9]+', name.lower()) if t]
    joined = ''.join(tokens)
    if 'alps' in tokens or joined.startswith('alps'):
        return 'ALPS'
    if 'mixup' in tokens:
        return 'MixUp'
    if 'ls' in tokens or 'labelsmoothing' in joined or ('label' in tokens and 'smoothing' in tokens):
        return 'LS'
    if 'dropout' in tokens:
        return 'Dropout'
    if 'erm' in tokens:
        return 'ERM'
    return None


def method_name(model: torch.nn.Module) -> str:
    """args.method when the checkpoint has one, else the name of the folder holding the checkpoint."""
    method = getattr(getattr(model, 'checkpoint_args', None), 'method', None)
    return str(method) if method else Path(model.checkpoint_path).resolve().parent.name


def eval_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """The evaluation subset of every tool here (this CLI's --max-samples, benchmarks.reproduce, train_timm.py's
    --max-eval-samples): `timm_alps.data.subset_indices`, n class-balanced samples drawn with `seed`, sorted."""
    from timm_alps.data import subset_indices
    return subset_indices(len(labels), n, seed, labels=labels)


def load_data(args) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 N x C x H x W images, int64 labels, description) from the chosen source."""
    sources = [s for s in (args.data_dir, args.npz, args.dataset) if s]
    if len(sources) > 1:
        raise ValueError('give one data source: --data-dir, --npz or --dataset')
    if args.dataset:
        images, labels = _load_timm_dataset(args.dataset, args.data_root, args.split)
        desc = f'{args.dataset} ({args.data_root}) split {args.split!r}'
    else:
        from timm_alps.data import BUNDLED_DATA_DIR, load_split_tensors
        src = args.data_dir or args.npz or BUNDLED_DATA_DIR
        if not Path(src).exists():
            raise ValueError(f'data source {str(src)!r} does not exist')
        try:  # an .npz that is not one, or an empty split, is named by the library's reader
            images, labels, _ = load_split_tensors(src, args.split)
        except KeyError as e:
            raise ValueError(f'{src} has no split {args.split!r} ({e}); pick one with --split') from e
        except (OSError, EOFError) as e:
            raise ValueError(f'data source {str(src)!r} cannot be read ({type(e).__name__}: {e})') from e
        except ValueError as e:
            if 'empty' in str(e) or str(src) in str(e):
                raise
            raise ValueError(f'data source {str(src)!r} cannot be read: {e}') from e
        desc = ('bundled CIFAR-10 subset' if src == BUNDLED_DATA_DIR else str(src)) + f' split {args.split!r}'
    if images.shape[0] == 0:
        raise ValueError(f'the data set is empty: {desc} holds no image')
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f'{desc}: {images.shape[0]} images but {labels.shape[0]} labels')
    if args.max_samples is not None and args.max_samples < images.shape[0]:
        keep = eval_subset(labels, args.max_samples, args.seed)
        images, labels = images[keep], labels[keep]
        desc += (f', first {args.max_samples} class-balanced of a seeded shuffle (seed {args.seed}, '
                 'timm_alps.data.subset_indices)')
    return images, labels.long(), desc


def _load_timm_dataset(name: str, root: Optional[str], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    from timm.data import create_dataset
    if root is None:
        raise ValueError(f'--dataset {name} needs --data-root (where the data set lives)')
    if not Path(root).exists():
        raise ValueError(f'--data-root {root!r} does not exist (for --dataset {name})')
    try:
        dataset = create_dataset(name, root=root, split=split, download=False)
    except Exception as e:  # timm/torchvision raise RuntimeError, FileNotFoundError, KeyError... for the same mistake
        raise ValueError(f'--dataset {name!r} split {split!r} could not be opened under --data-root {root!r} '
                         f'({type(e).__name__}: {e}); check the name (e.g. torch/cifar10, wds/NAME) and the '
                         'folder (nothing is downloaded)') from e
    images, labels = [], []
    for img, target in dataset:
        arr = np.asarray(img.convert('RGB') if hasattr(img, 'convert') else img)
        images.append(arr if arr.ndim == 3 else arr[..., None])
        labels.append(int(target))
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


class Batches:
    """uint8 tensors -> [0, 1] float batches on `device`, with a length for the progress bar."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device):
        self.images, self.labels, self.batch_size, self.device = images, labels, batch_size, device

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.labels), self.batch_size):
            x = self.images[i:i + self.batch_size].to(self.device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            yield x, self.labels[i:i + self.batch_size].to(self.device)


def build_attacks(args, device: torch.device):
    """White-box and transfer attack functions keyed '<attack>@<eps label>' (and 'unbounded'); the AutoAttack
    instances keep each model's per-attack totals and flags."""
    white, transfer = {}, {}
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for eps in args.eps:
        label = eps_label(eps)
        fns = {
            'fgsm': partial(fgsm, eps=eps),
            'pgd': partial(pgd, eps=eps, step_size=max(eps * args.pgd_step_ratio, 1e-12), steps=args.pgd_steps,
                           random_start=args.pgd_random_start, generator=gen),
            'apgd': partial(apgd_ce, eps=eps, steps=args.apgd_steps, n_restarts=args.apgd_restarts,
                            generator=gen),
        }
        if 'autoattack' in args.attacks:
            fns['autoattack'] = AutoAttack(eps, norm=args.norm, steps=args.autoattack_steps,
                                           n_queries=args.autoattack_queries, seed=args.seed)
        for name, fn in fns.items():
            if name in args.attacks:
                white[f'{name}@{label}'] = fn
                if name in TRANSFERABLE and args.source:
                    transfer[f'{name}@{label}'] = fn
    if 'unbounded' in args.attacks:
        white['unbounded'] = partial(unbounded_pgd, steps=args.unbounded_steps, step_size=args.unbounded_step_size)
    return white, transfer


def _paper_table(choice: str, num_classes: int) -> Optional[str]:
    if choice == 'auto':
        return {10: 'cifar10', 100: 'cifar100'}.get(num_classes)
    return None if choice == 'none' else choice


def autoattack_is_standard(args) -> bool:
    return args.autoattack_steps == 100 and args.autoattack_queries == 5000


def rows_from_result(result, names, paths, args, paper: Optional[str], models=None,
                     white=None) -> List[Dict[str, object]]:
    """One row per method and eps: errors (%), the unbounded check, AutoAttack's per-attack accuracies and flags."""
    rows = []
    paper_protocol = args.pgd_steps == 10 and abs(args.pgd_step_ratio - 0.25) < 1e-9 and not args.pgd_random_start
    for name, path in zip(names, paths):
        errors = result.errors[name]
        unbounded = errors.get('white-box/unbounded')
        paper_row = paper_method(name) if paper else None
        for eps in args.eps:
            label = eps_label(eps)
            row = {'method': name, 'checkpoint': path, 'eps': f'{eps:.6g}', 'eps_label': label,
                   'num_samples': result.num_samples}
            for key, _, prefix, attack in COLUMNS:
                setting = 'clean' if prefix is None else f'{prefix}/{attack}@{label}'
                row[f'{key}_err'] = _fmt(errors.get(setting))
            aa = white.get(f'autoattack@{label}') if white else None
            aa_result = aa.result(models[names.index(name)]) if aa is not None else None
            for attack in STANDARD_ATTACKS:
                row[f'aa_{attack}_acc'] = _fmt(aa_result.acc_after(attack) if aa_result else None)
            for flag in ('randomized', 'zero_gradients', 'square_stronger'):
                value = aa_result.flags[flag] if aa_result else None
                row[f'aa_{flag}'] = '' if value is None else str(value).lower()
            row['aa_seconds'] = f'{sum(aa_result.seconds.values()):.1f}' if aa_result else ''
            for attack in STANDARD_ATTACKS:
                row[f'aa_{attack}_seconds'] = f'{aa_result.seconds[attack]:.1f}' if aa_result else ''
            row['unbounded_acc'] = _fmt(None if unbounded is None else 100.0 - unbounded)
            row['gradient_masking'] = '' if unbounded is None else str(
                gradient_masking_suspected(100.0 - unbounded, args.masking_threshold)).lower()
            for key, _, prefix, attack in COLUMNS:
                figure = None
                if paper_row and key in PAPER_FIGURES[paper] and (key == 'clean' or abs(eps - PAPER_EPS) < 1e-9):
                    if not (attack == 'pgd' and not paper_protocol):
                        figure = PAPER_FIGURES[paper][key][paper_row]
                row[f'paper_{key}_err'] = _fmt(figure)
            rows.append(row)
    return rows


def _fmt(value: Optional[float]) -> str:
    return '' if value is None else f'{value:.2f}'


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(rows, path: Path, args, meta: Dict[str, str], paper: Optional[str]) -> None:
    pgd_name = f'PGD-{args.pgd_steps}'
    shown = [c for c in COLUMNS if c[0] == 'clean' or (
        c[3] in args.attacks and (c[2] == 'white-box' or args.source))]
    lines = ['# Robustness benchmark', '',
             f'Command: `{meta["command"]}`', '',
             f'- Data: {meta["data"]}, {meta["num_samples"]} images; device {meta["device"]}; '
             f'torch {torch.__version__}; wall time {meta["wall"]}.',
             '- Attacks in pixel space [0, 1], fp32, models in eval mode: ' + _attacks_desc(args, pgd_name),
             '- Black-box: ' + (f'examples crafted once on **{meta["source"]}** (`{args.source}`) and shown to every '
                                'model.' if args.source else 'not run (no --source).'),
             '- Cells: top-1 test error (%), lower is better; best per column in bold.']
    if meta['source_is_target']:
        lines.append('- The source is also one of the evaluated checkpoints: its black-box cells, marked (source), are '
                     'white-box attacks and are left out of the bold ranking.')
    if paper:
        lines.append(f'- In parentheses: the paper\'s {_PAPER_LABELS[paper]} PreActResNet18 figures (Guo et al., '
                     'IJCAI 2021, Tables 2-3, 5, 6) for the method the name matches, at eps = 4/255 only (their '
                     'PGD: 10 steps of 1/255); the paper trains full models on the full test set, so compare '
                     'rankings, not digits, on a subset.')
    for eps in args.eps:
        label = eps_label(eps)
        sub = [r for r in rows if r['eps_label'] == label]
        title = f'## eps = {label}' + (' (the paper\'s setting, Tables 5-6)' if abs(eps - PAPER_EPS) < 1e-9 else '')
        headers = ['Method'] + [h.format(pgd=pgd_name) for _, h, _, _ in shown]
        lines += ['', title, '', '| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
        best = {}
        for key, _, prefix, _ in shown:
            values = [float(r[f'{key}_err']) for r in sub if r[f'{key}_err'] != ''
                      and not (prefix == 'black-box' and _is_source(r, args))]
            best[key] = min(values) if len(values) > 1 else None
        for r in sub:
            cells = [str(r['method'])]
            for key, _, prefix, _ in shown:
                value = r[f'{key}_err']
                cell = value if value != '' else 'n/a'
                if prefix == 'black-box' and _is_source(r, args):
                    cell += ' (source)'
                elif value != '' and best[key] is not None and float(value) == best[key]:
                    cell = f'**{cell}**'
                if r[f'paper_{key}_err'] != '':
                    cell += f' ({r[f"paper_{key}_err"]})'
                cells.append(cell)
            lines.append('| ' + ' | '.join(cells) + ' |')
    if 'autoattack' in args.attacks:
        lines += ['', f'## AutoAttack ({_autoattack_desc(args)}, {args.norm}): robust accuracy (%) after each attack '
                      'and the sanity flags', '',
                  'Cumulative: each attack runs on the images still robust after the previous ones (the last column '
                  'before the flags is AutoAttack\'s robust accuracy). Flags as in the reference checks: '
                  '*randomized* = two forward passes differ; *zero grad.* = clean-correct images with an all-zero '
                  'input gradient; *Square stronger* = the black-box Square broke > 0.2% of the images the '
                  'white-box attacks left robust. Any flag means the white-box numbers may flatter the model.', '',
                  '| Method | eps | Clean acc. | APGD-CE | APGD-T | FAB-T | Square | randomized | zero grad. | '
                  'Square stronger | time (s) |', '|---|---|---|---|---|---|---|---|---|---|---|']
        for r in rows:
            accs = [r[f'aa_{a}_acc'] or 'n/a' for a in STANDARD_ATTACKS]
            clean = _fmt(100.0 - float(r['clean_err'])) if r['clean_err'] != '' else 'n/a'
            lines.append(f'| {r["method"]} | {r["eps_label"]} | {clean} | ' + ' | '.join(accs) + ' | '
                         f'{r["aa_randomized"]} | {r["aa_zero_gradients"]} | {r["aa_square_stronger"]} | '
                         f'{r["aa_seconds"]} |')
    if 'unbounded' in args.attacks:
        lines += ['', f'## Unbounded PGD sanity check (eps = inf, {args.unbounded_steps} steps of '
                      f'{args.unbounded_step_size:g})', '',
                  'An honestly evaluated model falls to ~0% accuracy when the perturbation may cover the whole image; '
                  f'accuracy above {args.masking_threshold:g}% means its gradients are masked and the bounded '
                  'white-box numbers above flatter it.', '',
                  '| Method | Accuracy (%) | Verdict |', '|---|---|---|']
        for r in rows:
            if r['eps_label'] == eps_label(args.eps[0]):
                verdict = 'gradient masking suspected' if r['gradient_masking'] == 'true' else 'ok'
                lines.append(f'| {r["method"]} | {r["unbounded_acc"]} | {verdict} |')
    lines += ['', 'Files: `robustness.csv` (one row per method and eps, paper figures in `paper_*` columns), '
                  '`robustness.json` (RobustBench-style fields per model), `robustness.png` (error against eps).', '']
    path.write_text('\n'.join(lines))


def _attacks_desc(args, pgd_name: str) -> str:
    """One sentence per attack that was run."""
    parts = []
    if 'fgsm' in args.attacks:
        parts.append('FGSM (L-inf)')
    if 'pgd' in args.attacks:
        parts.append(f'{pgd_name} (L-inf) with step {args.pgd_step_ratio:g} x eps'
                     f'{" and random start" if args.pgd_random_start else ", no random start"} (keeps each '
                     'sample\'s highest-loss iterate)')
    if 'apgd' in args.attacks:
        parts.append(f'APGD-CE (L-inf) {args.apgd_steps} steps, {args.apgd_restarts} restart(s)')
    if 'autoattack' in args.attacks:
        parts.append(f'AutoAttack ({_autoattack_desc(args)}, {args.norm}): APGD-CE, APGD-T, FAB-T, Square, each on '
                     'the images the previous ones left robust')
    if 'unbounded' in args.attacks:
        parts.append(f'unbounded PGD ({args.unbounded_steps} steps of {args.unbounded_step_size:g})')
    return '; '.join(parts) + '.'


def _autoattack_desc(args) -> str:
    if autoattack_is_standard(args):
        return 'standard version: 100 iterations, 9 targets, Square 5,000 queries'
    return (f'NOT the standard version: {args.autoattack_steps} iterations, Square {args.autoattack_queries} '
            'queries')


def _acc(err: str) -> Optional[float]:
    return None if err == '' else round(100.0 - float(err), 2)


def write_json(rows, path: Path, args, meta: Dict[str, str]) -> None:
    """RobustBench-style summary: per model `clean_acc`, `autoattack_acc`, `eps`, `threat_model`, `n_examples` at the
    RobustBench radius (8/255 L-inf, 0.5 L2) when it is in the grid, else the largest; every eps under `results`."""
    models = []
    exact_eps = {eps_label(e): e for e in args.eps}  # the csv rounds eps to 6 digits; RobustBench gives 8/255 exactly
    for method in dict.fromkeys(r['method'] for r in rows):
        sub = [r for r in rows if r['method'] == method]
        target = ROBUSTBENCH_EPS[args.norm]
        main_row = min(sub, key=lambda r: (abs(float(r['eps']) - target) > 1e-9, -float(r['eps'])))
        results = []
        for r in sub:
            entry = {'eps': exact_eps[r['eps_label']], 'eps_label': r['eps_label']}
            for key, _, prefix, attack in COLUMNS:
                if key != 'clean':
                    entry[f'{key}_acc'] = _acc(r[f'{key}_err'])
            entry['autoattack_acc_after'] = {a: float(r[f'aa_{a}_acc']) for a in STANDARD_ATTACKS
                                             if r[f'aa_{a}_acc'] != ''}
            entry['autoattack_seconds'] = float(r['aa_seconds']) if r['aa_seconds'] else None
            entry['autoattack_seconds_by_attack'] = {a: float(r[f'aa_{a}_seconds']) for a in STANDARD_ATTACKS
                                                     if r[f'aa_{a}_seconds'] != ''}
            entry['flags'] = {f: (int(r[f'aa_{f}']) if f == 'zero_gradients' else r[f'aa_{f}'] == 'true')
                              for f in ('randomized', 'zero_gradients', 'square_stronger') if r[f'aa_{f}'] != ''}
            results.append(entry)
        main = next(e for e in results if e['eps_label'] == main_row['eps_label'])
        unbounded = None if main_row['unbounded_acc'] == '' else float(main_row['unbounded_acc'])
        flags = dict(main['flags'])
        if unbounded is not None:
            flags['gradient_masking_unbounded_pgd'] = main_row['gradient_masking'] == 'true'
        models.append({
            'name': method, 'checkpoint': main_row['checkpoint'], 'paper_method': paper_method(method),
            'clean_acc': _acc(main_row['clean_err']), 'autoattack_acc': main['autoattack_acc'],
            'eps': main['eps'], 'eps_label': main['eps_label'],
            'threat_model': args.norm if 'autoattack' in args.attacks else 'Linf',
            'n_examples': int(main_row['num_samples']),
            'unbounded_pgd_acc': unbounded, 'flags': flags, 'results': results})
    doc = {
        'command': meta['command'], 'data': meta['data'], 'n_examples': int(meta['num_samples']),
        'device': meta['device'], 'torch': torch.__version__, 'wall': meta['wall'],
        'source': args.source, 'source_name': meta['source'] or None,
        'autoattack': ({'version': 'standard' if autoattack_is_standard(args) else 'custom',
                        'attacks': list(STANDARD_ATTACKS), 'norm': args.norm, 'steps': args.autoattack_steps,
                        'n_queries': args.autoattack_queries, 'n_target_classes': 9, 'seed': args.seed,
                        'implementation': _torchattacks_version()}
                       if 'autoattack' in args.attacks else None),
        'models': models,
    }
    path.write_text(json.dumps(doc, indent=1) + '\n')


def _torchattacks_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f'torchattacks {version("torchattacks")}'
    except PackageNotFoundError:
        return 'torchattacks (version unknown)'


def _is_source(row, args) -> bool:
    return bool(args.source) and Path(str(row['checkpoint'])).resolve() == Path(args.source).resolve()


def write_plot(rows, path: Path, args) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [(k, h) for k, h, p, a in COLUMNS if p is not None and a in args.attacks and (
        p == 'white-box' or args.source)]
    if not panels:
        return
    methods = list(dict.fromkeys(r['method'] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (key, header) in zip(axes[0], panels):
        for method in methods:
            sub = sorted((r for r in rows if r['method'] == method), key=lambda r: float(r['eps']))
            xs = [0.0] + [float(r['eps']) * 255 for r in sub]
            ys = [float(sub[0]['clean_err'])] + [float(r[f'{key}_err']) for r in sub]
            ax.plot(xs, ys, marker='o', label=method)
        ax.set_title(header.format(pgd=f'PGD-{args.pgd_steps}'))
        ax.set_xlabel('eps (x 1/255)')
        ax.set_ylabel('top-1 error (%)')
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m benchmarks.robustness', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('checkpoints', nargs='+', help='train_timm.py checkpoints (one per method)')
    p.add_argument('--names', nargs='+', default=None,
                   help='method names, one per checkpoint (default: args.method, else the checkpoint folder)')
    p.add_argument('--source', default=None, help='checkpoint to craft black-box examples on (the ERM model)')
    p.add_argument('--source-name', default=None, help='name of the source in the report')
    p.add_argument('--ema', action='store_true', help="evaluate the checkpoints' EMA weights (state_dict_ema)")
    p.add_argument('--model', default=None, help='timm model name, overriding the checkpoints\' arch')
    p.add_argument('--num-classes', type=int, default=None, help='overrides the checkpoints\' num_classes')
    data = p.add_argument_group('data (default: the bundled CIFAR-10 test subset)')
    data.add_argument('--data-dir', default=None, help='webdataset shard folder from `python -m timm_alps.data`')
    data.add_argument('--npz', default=None, help='.npz with uint8 NHWC x_<split> and y_<split>')
    data.add_argument('--dataset', default=None, help='timm dataset name, e.g. torch/cifar10 or wds/cifar10')
    data.add_argument('--data-root', default=None, help='root folder for --dataset')
    data.add_argument('--split', default='test', help='split to evaluate')
    data.add_argument('--max-samples', type=int, default=None,
                      help='N class-balanced images drawn with --seed (timm_alps.data.subset_indices)')
    atk = p.add_argument_group('attacks')
    atk.add_argument('--attacks', nargs='+', choices=ATTACKS, default=list(DEFAULT_ATTACKS),
                     help='autoattack (the standard version) needs `pip install "timm-alps[robustness]"`')
    atk.add_argument('--eps', nargs='+', type=parse_eps, default=[2 / 255, 4 / 255, 8 / 255],
                     help='radii in [0, 1] pixel units, e.g. 2/255 4/255 8/255 (L-inf; with --norm L2, e.g. 0.5)')
    atk.add_argument('--norm', choices=NORMS, default='Linf',
                     help='threat model of AutoAttack (FGSM, PGD and APGD-CE here are L-inf only)')
    atk.add_argument('--autoattack-steps', type=int, default=100,
                     help='iterations of APGD-CE, APGD-T and FAB-T inside AutoAttack (standard: 100)')
    atk.add_argument('--autoattack-queries', type=int, default=5000, help='Square queries (standard: 5000)')
    atk.add_argument('--pgd-steps', type=int, default=10)
    atk.add_argument('--pgd-step-ratio', type=float, default=0.25,
                     help='PGD step as a fraction of eps (0.25: the paper\'s 1/255 at 4/255)')
    atk.add_argument('--pgd-random-start', action='store_true')
    atk.add_argument('--apgd-steps', type=int, default=100)
    atk.add_argument('--apgd-restarts', type=int, default=1)
    atk.add_argument('--unbounded-steps', type=int, default=200)
    atk.add_argument('--unbounded-step-size', type=float, default=0.01)
    atk.add_argument('--masking-threshold', type=float, default=UNBOUNDED_MAX_ACCURACY,
                     help='unbounded-PGD accuracy (%%) above which gradient masking is reported')
    run = p.add_argument_group('run')
    run.add_argument('--batch-size', type=int, default=256)
    run.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    run.add_argument('--seed', type=int, default=0, help='seed of the --max-samples draw and the random starts')
    run.add_argument('--paper', choices=('auto', 'cifar10', 'cifar100', 'none'), default='auto',
                     help='paper figures to show alongside (auto: by number of classes)')
    run.add_argument('--output', default='benchmarks/results/robustness', help='folder for the three files')
    run.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def _validate(args) -> None:
    """Every flag checked before anything is loaded or attacked; each error names the flag and the value."""
    if args.names is not None and len(args.names) != len(args.checkpoints):
        raise ValueError(f'--names gives {len(args.names)} names for {len(args.checkpoints)} checkpoints')
    if args.names is not None and not all(n.strip() for n in args.names):
        raise ValueError(f'--names must be non-empty, got {args.names}')
    for name in ('batch_size', 'pgd_steps', 'apgd_steps', 'apgd_restarts', 'unbounded_steps', 'autoattack_steps',
                 'autoattack_queries'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    for name in ('max_samples', 'num_classes'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {value}')
    for name in ('pgd_step_ratio', 'unbounded_step_size'):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f'--{name.replace("_", "-")} must be a finite number > 0, got {value}')
    if not 0 <= args.masking_threshold <= 100:  # also NaN
        raise ValueError(f'--masking-threshold is an accuracy in %: it must lie in [0, 100], got '
                         f'{args.masking_threshold}')
    if args.seed < 0:
        raise ValueError(f'--seed must be >= 0, got {args.seed}')
    if not args.split.strip():
        raise ValueError('--split must name a split, e.g. test')
    if len(set(args.eps)) != len(args.eps):
        raise ValueError(f'--eps lists a radius twice: {[eps_label(e) for e in args.eps]}')
    if args.norm == 'L2':
        linf = [a for a in args.attacks if a in LINF_ONLY]
        if linf:
            raise ValueError(f'--norm L2 applies to AutoAttack only; {", ".join(linf)} here are L-inf attacks: '
                             'run them in a separate call, or pass --attacks autoattack [unbounded]')
    if 'autoattack' in args.attacks:
        from timm_alps.autoattack import _torchattacks
        try:
            _torchattacks()
        except ImportError as e:
            raise ValueError(str(e)) from e
    check_device(args.device)


def check_device(text: str) -> torch.device:
    """torch.device(text), refused when it is not a device name or this machine does not have it."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f'--device {text!r} is not a device name (e.g. cpu, cuda, cuda:1)') from e
    if device.type == 'cpu':
        return device
    backend = getattr(torch, device.type, None) if device.type != 'mps' else getattr(torch.backends, 'mps', None)
    available = bool(backend is not None and hasattr(backend, 'is_available') and backend.is_available())
    if not available:
        raise ValueError(f'--device {text!r}: no {device.type} device is available on this machine; use --device cpu')
    count = getattr(backend, 'device_count', lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(f'--device {text!r}: this machine has {count} {device.type} device(s)')
    return device


def prepare_output(folder: str) -> Path:
    """Create `folder` and prove it writable, before any attack runs (a failure after an hour of attacks is lost)."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f'--output {folder!r} is a file, not a folder')
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f'.write-test-{os.getpid()}'
        probe.write_text('')
        probe.unlink()
    except OSError as e:
        raise ValueError(f'--output {folder!r} cannot be written ({e.strerror or e}); pick another folder') from e
    return out


def run(args, argv: Sequence[str]) -> Dict[str, Path]:
    """Evaluate, write robustness.md / .csv / .png under `args.output`, return their paths."""
    _validate(args)
    out = prepare_output(args.output)
    start = time.perf_counter()
    device = check_device(args.device)
    load = partial(load_checkpoint_model, device=device, use_ema=args.ema, model_name=args.model,
                   num_classes=args.num_classes)
    models = [load(path) for path in args.checkpoints]
    names = list(args.names) if args.names else [method_name(m) for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f'method names {names} are not unique; name the checkpoints with --names')
    source = load(args.source) if args.source else None
    source_name = args.source_name or (method_name(source) if source is not None else None)

    images, labels, desc = load_data(args)
    white, transfer = build_attacks(args, device)
    result = evaluate_robustness(
        dict(zip(names, models)), Batches(images, labels, args.batch_size, device), attacks=white,
        source=source, transfer_attacks=transfer or None, progress=False if args.no_progress else None)

    paper = _paper_table(args.paper, models[0].num_classes)
    rows = rows_from_result(result, names, list(args.checkpoints), args, paper, models=models, white=white)
    paths = {'md': out / 'robustness.md', 'csv': out / 'robustness.csv', 'json': out / 'robustness.json',
             'png': out / 'robustness.png'}
    meta = {
        'command': 'python -m benchmarks.robustness ' + ' '.join(shlex.quote(a) for a in argv),
        'data': desc, 'num_samples': str(result.num_samples), 'device': f'{device} ({machine_line(device)})',
        'wall': f'{time.perf_counter() - start:.0f} s', 'source': source_name or '',
        'source_is_target': any(_is_source({'checkpoint': c}, args) for c in args.checkpoints),
    }
    write_csv(rows, paths['csv'])
    write_markdown(rows, paths['md'], args, meta, paper)
    write_json(rows, paths['json'], args, meta)
    write_plot(rows, paths['png'], args)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        paths = run(args, argv)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(paths['md'].read_text())
    return paths


if __name__ == '__main__':
    main()
