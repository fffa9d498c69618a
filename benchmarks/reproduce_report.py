""" The results of `benchmarks.reproduce`: runs.csv, the durable record of every run, and what is drawn from it

`runs.csv` holds one row per run: what it is (group, method, seed, ALPS setting), its status, time and machine,
every metric of the table (clean error and each attack's error, in %), the unbounded-PGD accuracy, the PGD error
against eps, the per-epoch test error and train loss, and its training command. `table.md` / `table.csv`,
`curves.png`, `eps.png` and `commands.md` are regenerated from it alone, so a row stays in them whether or not its
run is still on disk.
"""
import csv
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

METHODS = ('erm', 'dropout', 'ls', 'mixup', 'alps', 'alps-ramp')
METHOD_LABELS = dict(erm='ERM', dropout='Dropout', ls='Label smoothing', mixup='MixUp', alps='ALPS',
                     **{'alps-ramp': 'ALPS + eps ramp'})
EVAL_SEED = 0
PAPER_METRICS = ('clean', 'white-box/fgsm', 'white-box/pgd', 'black-box/fgsm', 'black-box/pgd')
METRIC_LABELS = {'clean': 'clean', 'white-box/fgsm': 'FGSM white', 'white-box/pgd': 'PGD-10 white',
                 'black-box/fgsm': 'FGSM black', 'black-box/pgd': 'PGD-10 black', 'white-box/apgd-ce': 'APGD-CE white',
                 'white-box/fgsm@norm': 'FGSM white (eps norm.)', 'white-box/pgd@norm': 'PGD-10 white (eps norm.)',
                 'black-box/fgsm@norm': 'FGSM black (eps norm.)', 'black-box/pgd@norm': 'PGD-10 black (eps norm.)'}
# runs.csv columns besides the metrics (columns named 'clean', 'white-box/...', 'black-box/...')
HEAD = ('group', 'dataset', 'model', 'method', 'tag', 'alps_eps', 'alps_beta', 'seed', 'run', 'status', 'epochs',
        'epochs_done', 'train_seconds', 'train_img_per_sec', 'eval_seconds')
TAIL = ('unbounded_accuracy', 'gradient_masking_suspected', 'autoattack_flags', 'eps_normalised_pixels',
        'black_source', 'eval_protocol', 'pgd_curve', 'curve', 'machine', 'command', 'invocations')
JSON_COLUMNS = ('pgd_curve', 'curve', 'invocations')
STATUS_RANK = {'missing': 0, 'partial': 1, 'finished': 2}


def is_metric(key: str) -> bool:
    return key == 'clean' or key.startswith(('white-box/', 'black-box/'))


def result_paths(out_dir: Path, sweep_name: Optional[str] = None) -> Dict[str, Path]:
    """Where a comparison (table.md, runs.csv, commands.md) or a sweep (sweep-<name>.md, -runs.csv, ...) goes."""
    stem = f'sweep-{sweep_name}' if sweep_name else 'table'
    runs = f'{stem}-' if sweep_name else ''
    return dict(dir=out_dir, md=out_dir / f'{stem}.md', csv=out_dir / f'{stem}.csv',
                runs_csv=out_dir / f'{runs}runs.csv', commands_md=out_dir / f'{runs}commands.md')


def read_runs_csv(path: Path, epochs: Optional[int] = None, protocol: Optional[int] = None) -> List[Dict[str, Any]]:
    """The records of a runs.csv (empty when absent); numbers as floats, empty cells left out.

    Raises:
        ValueError: a runs.csv without per-run metrics (an earlier format): rewriting its folder would lose them;
            one of runs of another epoch budget than `epochs` (one table is one recipe); or one of runs evaluated
            with an earlier protocol than `protocol` (the regenerated tables would describe this protocol).
    """
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if rows and 'method' not in rows[0]:
        raise ValueError(f'{path} records only the clean error per run (an earlier runs.csv format), so rewriting '
                         f'{path.parent} would lose the other results of runs not on disk: pass another --results-dir')
    records = []
    for row in rows:
        rec: Dict[str, Any] = {}
        for key, value in row.items():
            if value == '':
                continue
            if key in JSON_COLUMNS:
                rec[key] = json.loads(value)
            elif is_metric(key) or key in ('unbounded_accuracy', 'eps_normalised_pixels', 'eval_seconds',
                                           'alps_eps'):
                rec[key] = float(value)
            elif key in ('seed', 'epochs', 'epochs_done', 'eval_protocol'):
                rec[key] = int(value)
            elif key in ('train_seconds', 'train_img_per_sec'):
                # written as whole numbers (collect rounds them); older reports wrote some as '2606.0'
                rec[key] = round(float(value))
            elif key == 'gradient_masking_suspected':
                rec[key] = value == 'True'
            else:
                rec[key] = value
        records.append(rec)
    other = sorted({r.get('epochs', 0) for r in records} - {epochs}) if epochs is not None else []
    if other:
        raise ValueError(f'{path} records runs of {", ".join(map(str, other))} epochs, not {epochs}: pass another '
                         f'--results-dir (one table is one recipe)')
    older = sorted({r['eval_protocol'] for r in records if r.get('eval_protocol', protocol) < protocol}) \
        if protocol is not None else []
    if older:
        raise ValueError(f'{path} records runs evaluated with an earlier protocol ({", ".join(map(str, older))}) '
                         f'than this runner\'s ({protocol}); tables written now would describe the current one: '
                         f'pass another --results-dir')
    return records


def _csv_cell(key: str, value: Any) -> Any:
    """How runs.csv writes one value: JSON for the structured columns, metrics rounded to 1e-6 (100 - 89.98 is
    written 10.02, not 10.019999999999996), the normalised radius to 4 significant digits."""
    if key == 'pgd_curve':
        return json.dumps({e: round(x, 6) for e, x in value.items()})
    if key in JSON_COLUMNS:
        return json.dumps(value)
    if key == 'eps_normalised_pixels' and value:
        return f'{value:.4g}'
    return round(value, 6) if isinstance(value, float) and is_metric(key) else value


def write_runs_csv(records: Sequence[Dict[str, Any]], path: Path) -> None:
    metrics = sorted({k for r in records for k in r if is_metric(k)}, key=_metric_order)
    with open(path.with_name(path.name + '.part'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(HEAD) + metrics + list(TAIL), extrasaction='ignore')
        w.writeheader()
        for r in records:
            w.writerow({k: _csv_cell(k, v) for k, v in r.items() if v not in ('', None, [], {})})
    path.with_name(path.name + '.part').replace(path)


def _metric_order(metric: str):
    known = list(PAPER_METRICS) + ['white-box/apgd-ce']
    return (known.index(metric) if metric in known else len(known), metric)


def merge(committed: Sequence[Dict[str, Any]], collected: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The committed records with the runs found on disk: a run replaces its own row only when it has come at least
    as far (status) and measured at least what the row holds, so a deleted or half-evaluated run loses nothing."""
    rows = {(r['group'], r['run']): r for r in committed}
    for rec in collected:
        old = rows.get((rec['group'], rec['run']))
        if old is None or (STATUS_RANK[rec['status']] >= STATUS_RANK[old['status']]
                           and {k for k in old if is_metric(k)} <= {k for k in rec if is_metric(k)}):
            rows[(rec['group'], rec['run'])] = rec
        elif rec['status'] != 'missing':
            print(f'[reproduce] {rec["group"]}/{rec["run"]}: kept the recorded row (the run on disk has fewer '
                  f'results; evaluate it to replace the row)', flush=True)
    return list(rows.values())


def table_metrics(ev: Dict[str, Any]) -> List[str]:
    """The table's columns: the paper's, APGD-CE, AutoAttack per eps and (with `normalised_eps`) the paper protocol
    with eps in normalised-input units."""
    metrics = list(PAPER_METRICS) + ['white-box/apgd-ce']
    metrics += [f'white-box/autoattack@{e}' for e in ev.get('autoattack_eps', ()) if ev.get('autoattack_samples')]
    if ev.get('normalised_eps'):
        metrics += [f'{box}/{a}@norm' for box in ('white-box', 'black-box') for a in ('fgsm', 'pgd')]
    return metrics


def metric_label(metric: str) -> str:
    if metric.startswith('white-box/autoattack@'):
        return f'AutoAttack {metric.rsplit("@", 1)[1]}/255'
    return METRIC_LABELS[metric]


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return 'missing'
    return f'{statistics.mean(values):.2f}' if len(values) == 1 else \
        f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def aggregate(records: Sequence[Dict[str, Any]], metrics: Sequence[str]) -> List[Dict[str, Any]]:
    """Per (group, method, tag): each metric's values over the seeds that have it, in table order."""
    from benchmarks.paper_numbers import paper_error
    keys = sorted(dict.fromkeys((r['group'], r['method'], r.get('tag', '')) for r in records),
                  key=lambda k: (k[0], METHODS.index(k[1]), k[2]))
    rows = []
    for group, method, tag in keys:
        recs = [r for r in records if (r['group'], r['method'], r.get('tag', '')) == (group, method, tag)]
        r0 = recs[0]
        paper_model = re.sub(r'_w\d+$', '', r0['model'])  # narrow CPU variants beside the paper's full width
        rows.append(dict(
            group=group, dataset=r0['dataset'], model=r0['model'], method=method, tag=tag,
            alps=(r0.get('alps_eps'), r0.get('alps_beta')), seeds_planned=len(recs),
            seeds_done=[r['seed'] for r in recs if r['status'] == 'finished'],
            values={m: [r[m] for r in recs if m in r] for m in metrics},
            paper={m: p for m in metrics if not tag and m.replace('@norm', '') in PAPER_METRICS
                   for p in [paper_error(r0['dataset'], paper_model, method, m.replace('@norm', ''))] if p},
            unbounded=[r['unbounded_accuracy'] for r in recs if 'unbounded_accuracy' in r],
            masking=any(r.get('gradient_masking_suspected') for r in recs),
            autoattack_flags=sorted({f for r in recs for f in r.get('autoattack_flags', '').split()})))
    rows.sort(key=lambda r: (r['group'], METHODS.index(r['method']), r['alps'][0] or 0,
                             tuple(map(float, (r['alps'][1] or '').split()))))
    return rows


def goal_checks(rows: Sequence[Dict[str, Any]], samples: Optional[Dict[str, int]] = None) -> List[str]:
    """The paper's claims checked against the measured means, one line each.

    `samples` (metric -> test images) adds a noise verdict: a difference within two standard errors of the
    difference of the two means is within noise. The standard error counts the test sample (two error rates on that
    many images) and, where both methods have at least two seeds, the spread over seeds (Welch: each method's seed
    variance over its number of seeds); with one seed of either method only the test sample counts, and the line
    says so.
    """
    lines = []
    for group in dict.fromkeys(r['group'] for r in rows):
        by = {r['method']: r for r in rows if r['group'] == group and not r['tag']}

        def check(text, metric, a_method, b_method, strict):
            va, vb = (by.get(m, {}).get('values', {}).get(metric) or [] for m in (a_method, b_method))
            if not va or not vb:
                lines.append(f'- {group}: {text}: not measured (runs missing)')
                return
            a, b = statistics.mean(va), statistics.mean(vb)
            ok = a < b if strict else a <= b
            relation = ('<' if strict else '<=') if ok else 'vs'
            line = f'- {group}: {text}: **{"yes" if ok else "NO"}** ({a:.2f} {relation} {b:.2f}'
            n = (samples or {}).get(metric)
            if n:
                var = 1e4 * ((a / 100) * (1 - a / 100) + (b / 100) * (1 - b / 100)) / n
                if len(va) > 1 and len(vb) > 1:
                    var += statistics.variance(va) / len(va) + statistics.variance(vb) / len(vb)
                    basis = f'{n} images and {len(va)} + {len(vb)} seeds'
                else:
                    basis = f'{n} images; test sample only, a method has one seed'
                se = math.sqrt(var)
                line += f'; {"within" if abs(a - b) <= 2 * se else "beyond"} noise: 2 SE = {2 * se:.2f} on {basis}'
            lines.append(line + ')')

        check('ALPS clean error <= MixUp', 'clean', 'alps', 'mixup', False)
        check('MixUp clean error < ERM', 'clean', 'mixup', 'erm', True)
        robust = ['white-box/fgsm', 'white-box/pgd'] + sorted(
            {m for r in by.values() for m in r['values'] if m.startswith('white-box/autoattack@')},
            key=lambda m: -int(m.rsplit('@', 1)[1]))
        for metric in robust:
            for base in ('erm', 'mixup'):
                check(f'ALPS {metric_label(metric)} error < {METHOD_LABELS[base]}', metric, 'alps', base, True)
        def measured(metric):  # [metric] when some method of the group has it, for columns a preset may lack
            return [metric] if any(metric in r['values'] for r in by.values()) else []

        # the other baselines: ALPS against each, and whether the baseline's own resistance to PGD-10 holds under
        # transfer, APGD-CE and AutoAttack (resistance that falls to them is gradient masking, not robustness)
        strong = ['white-box/pgd'] + measured('black-box/pgd') + ['white-box/apgd-ce'] + robust[2:]
        norm = measured('white-box/pgd@norm')
        for base in ('ls', 'dropout'):
            if base in by:
                check(f'ALPS clean error <= {METHOD_LABELS[base]}', 'clean', 'alps', base, False)
                for metric in strong + norm:
                    check(f'ALPS {metric_label(metric)} error < {METHOD_LABELS[base]}', metric, 'alps', base, True)
                for metric in strong:
                    check(f'{METHOD_LABELS[base]} {metric_label(metric)} error < ERM', metric, base, 'erm', True)
        if 'alps-ramp' in by:  # the ramp may be the default only if it costs nothing at convergence
            for metric in ['clean'] + robust:
                check(f'ALPS + eps ramp {metric_label(metric)} error <= ALPS', metric, 'alps-ramp', 'alps', False)
    return lines


def eps_hypothesis(rows: Sequence[Dict[str, Any]], pixels: Optional[float] = None) -> List[str]:
    """Which reading of the paper's radius 4 reproduces its ERM and MixUp figures: 4/255 in pixel units or 4/255
    applied to the normalised input (`@norm` columns)? One line per method and attack."""
    lines = []
    for row in rows:
        if row['tag'] or row['method'] not in ('erm', 'mixup'):
            continue
        for metric in ('white-box/fgsm', 'white-box/pgd', 'black-box/fgsm', 'black-box/pgd'):
            paper, ours, norm = row['paper'].get(metric), row['values'].get(metric), row['values'].get(f'{metric}@norm')
            if not paper or not ours or not norm:
                continue
            a, b = statistics.mean(ours), statistics.mean(norm)
            gap_norm, gap_pixel = abs(b - paper[0]), abs(a - paper[0])
            closer = ('neither (a tie)' if gap_norm == gap_pixel else
                      'normalised-input eps' if gap_norm < gap_pixel else 'pixel eps')
            lines.append(f'- {row["group"]}: {METHOD_LABELS[row["method"]]} {METRIC_LABELS[metric]}: paper '
                         f'{paper[0]:.2f}; pixel eps 4/255 {a:.2f}; normalised-input eps 4/255 '
                         f'{"(" + format(pixels * 255, ".2f") + "/255 in pixels) " if pixels else ""}{b:.2f}: '
                         f'**{closer}** is closer')
    return lines


def eps_table(records: Sequence[Dict[str, Any]]) -> List[str]:
    """White-box PGD-10 error against eps (mean over the seeds that recorded it), one row per method; runs whose
    curve is not recorded are named."""
    lines = []
    for group in dict.fromkeys(r['group'] for r in records):
        recs = [r for r in records if r['group'] == group and not r.get('tag') and r.get('pgd_curve')]
        unrecorded = [r['run'] for r in records if r['group'] == group and not r.get('tag')
                      and 'white-box/pgd' in r and not r.get('pgd_curve')]
        if recs:
            eps = sorted({float(e) for r in recs for e in r['pgd_curve']})
            lines += [f'White-box PGD-10 error (%) against eps, {group} (mean over seeds; step eps/4):', '',
                      '| method | seeds | ' + ' | '.join(f'{e:g}/255' if e else 'clean' for e in eps) + ' |',
                      '|' + '---|' * (len(eps) + 2)]
            for method in METHODS:
                curves = [{float(e): v for e, v in r['pgd_curve'].items()} for r in recs if r['method'] == method]
                if curves:
                    lines.append(f'| {METHOD_LABELS[method]} | {len(curves)} | '
                                 + ' | '.join(_fmt([c[e] for c in curves if e in c]) for e in eps) + ' |')
            lines.append('')
        if unrecorded:
            lines += [f'PGD-10 error against eps not recorded in runs.csv for {group}: {", ".join(unrecorded)} '
                      f'(evaluated before runs.csv kept it; eps.png and the git history of this table show it).', '']
    return lines


def protocol_text(preset: Dict[str, Any], n_seeds: Optional[int] = None) -> str:
    ev, n_seeds = preset['eval'], n_seeds or len(preset['seeds'])
    text = (f'Top-1 test error (%), mean ± std over the finished seeds (n = seeds finished of '
            f'{n_seeds} planned), beside the paper\'s number in brackets (paper: full-width model, 200 '
            f'epochs). Every number comes from `timm_alps.attacks.evaluate_robustness` / `transfer_attack` on N '
            f'class-balanced test images drawn with seed {EVAL_SEED} (`timm_alps.data.subset_indices`, the subsets of '
            f'`python -m benchmarks.robustness --max-samples N`): clean error on {ev["clean_samples"]}, FGSM / PGD-10 '
            f'on {ev["samples"]}, APGD-CE on {ev["apgd_samples"]} ({ev["apgd_steps"]} steps)')
    if ev.get('autoattack_samples'):
        steps, queries = ev.get('autoattack_steps', 100), ev.get('autoattack_queries', 5000)
        version = 'standard version' if (steps, queries) == (100, 5000) else \
            f'NOT the standard version: {steps} iterations, {queries} Square queries'
        text += f', AutoAttack ({version}, L-inf, `timm_alps.autoattack`) on {ev["autoattack_samples"]}'
    text += ('. FGSM radius 4/255; PGD-10 step 1/255 radius 4/255, both in [0, 1] pixel units; white-box = the model '
             'attacks itself; black-box = ')
    text += ('examples crafted on the ERM model of the next seed (cyclic: seed s is attacked with examples from '
             'erm-s(s+1)), so every row, ERM included, is a transfer between independently trained models.'
             if n_seeds > 1 else 'examples crafted on the ERM model of the same seed (one seed only: ERM\'s '
                                 'black-box equals its white-box).')
    if ev.get('normalised_eps'):
        text += (' Columns "(eps norm.)": the same attacks with eps = 4/255 in normalised-input units, i.e. '
                 '4/255 x the mean per-channel std in pixels (about 1/255 on CIFAR): the hypothesis that the paper '
                 'applied its radius to the normalised input.')
    return text


def _machines(records: List[Dict[str, Any]]) -> List[str]:
    """The distinct machine lines (CPU or GPU, cores, torch threads) the runs of `records` trained on."""
    return list(dict.fromkeys(m for r in records for m in r.get('machine', '').split('; ') if m))


def write_results(records: List[Dict[str, Any]], preset: Dict[str, Any], paths: Dict[str, Path], invocation: str,
                  data: Dict[str, str], sweep: Optional[str] = None) -> Path:
    """runs.csv (the record), then from it the table (.md, .csv), the figures, commands.md and environment.json.

    Returns:
        The path of the markdown table.
    """
    from benchmarks.machine import environment
    paths['dir'].mkdir(parents=True, exist_ok=True)
    write_runs_csv(records, paths['runs_csv'])
    metrics = table_metrics(preset['eval'])
    rows = aggregate(records, metrics)
    if sweep:
        for row in rows:
            row['paper'] = {}  # the paper gives no per-setting numbers
    _table_csv(rows, metrics, paths['csv'])
    _table_md(rows, records, metrics, preset, paths, sweep)
    if not sweep:
        _plots(records, paths['dir'])
    invocations = list(dict.fromkeys(i for r in records for i in r.get('invocations', ()))) + [invocation]
    paths['commands_md'].write_text('\n'.join([
        f'# Commands of preset `{preset["name"]}`', '', 'Runner calls that trained and attacked these runs, then the '
        'one that wrote this folder:', '', '```bash', *invocations, '```', '', 'Training runs (the runner adds '
        '`--resume auto` to continue an interrupted run; paths are those of the machine that ran them):', '',
        '```bash', *[r['command'] for r in records if r.get('command')], '```', '', f'Data: {json.dumps(data)}', '']))
    # the software is the writer's; the machine and threads are the runs' own (a report-only call on a laptop
    # must not stamp its thread count on runs trained elsewhere)
    env = {k: v for k, v in environment().items() if k not in ('machine', 'torch_threads')}
    env['run_machines'] = _machines(records)
    (paths['dir'] / 'environment.json').write_text(json.dumps(env, indent=1) + '\n')
    return paths['md']


def _table_csv(rows: Sequence[Dict[str, Any]], metrics: Sequence[str], path: Path) -> None:
    """One line per (method, setting, metric): mean, std, the per-seed values and the paper's mean / std."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['dataset', 'model', 'method', 'setting', 'metric', 'mean', 'std', 'n_seeds', 'seeds_planned',
                    'values', 'paper_mean', 'paper_std'])
        for row in rows:
            for metric in metrics:
                vals, p = row['values'][metric], row['paper'].get(metric)
                m = statistics.mean(vals) if vals else float('nan')
                s = statistics.stdev(vals) if len(vals) > 1 else float('nan')
                w.writerow([row['dataset'], row['model'], row['method'], row['tag'] or 'default', metric,
                            f'{m:.3f}', f'{s:.3f}', len(vals), row['seeds_planned'],
                            ' '.join(f'{v:.2f}' for v in vals), p[0] if p else '', p[1] if p else ''])


def _table_md(rows, records, metrics, preset, paths, sweep) -> None:
    from benchmarks.reproduce import milestones
    ev = preset['eval']
    machines = _machines(records)
    md = [f'# ALPS reproduction: preset `{preset["name"]}`' + (f', sweep `{sweep}`' if sweep else ''), '',
          f'{preset["description"]}.', '', protocol_text(preset, len({r['seed'] for r in records})), '',
          f'Machine: {"; ".join(machines) or "no run yet"}.', '']
    done = sum(r['status'] == 'finished' for r in records)
    if done < len(records):
        md += [f'**Partial**: {done} of {len(records)} runs finished; missing cells are runs still to train.', '']
    for group in dict.fromkeys(r['group'] for r in rows):
        grows = [r for r in rows if r['group'] == group]
        md += [f'## {group} ({preset["epochs"]} epochs; LR {preset["lr"]:g}, /10 from epochs '
               f'{" and ".join(map(str, milestones(preset)))} on, 1-based)', '']
        head = ['ALPS setting' if sweep else 'method', 'seeds'] + [metric_label(m) for m in metrics] + \
            ['unbounded PGD acc.']
        md += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for row in grows:
            if sweep:
                a, b = row['alps'][1].split()
                label = f'eps {row["alps"][0]:g}, Beta({a}, {b})'
            else:
                label = METHOD_LABELS[row['method']]
            cells = [label, f'{len(row["seeds_done"])}/{row["seeds_planned"]}']
            for metric in metrics:
                p = row['paper'].get(metric)
                cells.append(_fmt(row['values'][metric]) + (f' [{p[0]:.2f}]' if p else ''))
            cells.append(_fmt(row['unbounded']) + (' (masking?)' if row['masking'] else ''))
            md.append('| ' + ' | '.join(cells) + ' |')
        flagged = [f'{METHOD_LABELS[r["method"]]}: {", ".join(r["autoattack_flags"])}' for r in grows
                   if r['autoattack_flags']]
        md += ['', 'AutoAttack sanity flags: ' + ('; '.join(flagged) if flagged else 'none raised') + '.'
               if ev.get('autoattack_samples') else '', '']
    if not sweep:
        samples = {'clean': ev['clean_samples'], 'white-box/fgsm': ev['samples'], 'white-box/pgd': ev['samples'],
                   'white-box/pgd@norm': ev['samples'], 'black-box/pgd': ev['samples'],
                   'white-box/apgd-ce': ev.get('apgd_samples'),
                   **{f'white-box/autoattack@{e}': ev.get('autoattack_samples') for e in ev.get('autoattack_eps', ())}}
        md += ['## The paper\'s claims, checked', ''] + goal_checks(rows, samples) + ['']
        if ev.get('normalised_eps'):
            pixels = next((r['eps_normalised_pixels'] for r in records if r.get('eps_normalised_pixels')), None)
            md += ['## What the paper\'s "radius 4" means', ''] + (
                eps_hypothesis(rows, pixels) or ['- not measured yet (ERM / MixUp runs missing)']) + ['']
        md += eps_table(records)
    runs_csv, commands_md = paths['runs_csv'].name, paths['commands_md'].name
    md += ['Unbounded PGD (eps = inf, step 0.01, '
           f'{ev["unbounded_steps"]} steps, first {ev["unbounded_samples"]} images): accuracy must fall to ~0%; '
           '"masking?" flags a model above 1%, whose white-box numbers would then flatter it.', '',
           (f'Figures: [curves.png](curves.png) (test error and train loss per epoch), [eps.png](eps.png) '
            f'(white-box PGD-10 error against eps, step eps/4, first {ev["curve_samples"]} images). '
            if not sweep else '') +
           f'Per-run status, wall time and throughput: [{runs_csv}]({runs_csv}); exact commands: '
           f'[{commands_md}]({commands_md}); software and machine: [environment.json](environment.json).', '']
    paths['md'].write_text('\n'.join(md))


def _plots(records: Sequence[Dict[str, Any]], out_dir: Path) -> None:
    """curves.png (test error and train loss per epoch) and eps.png (PGD-10 error against eps), each redrawn only
    when every run it would show has its data in runs.csv (else the figure on disk is kept)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    main = [r for r in records if not r.get('tag')]
    groups = list(dict.fromkeys(r['group'] for r in main))
    colors = {m: f'C{i}' for i, m in enumerate(METHODS)}
    first_seed = min((r['seed'] for r in main), default=0)
    if any(r['status'] == 'finished' and not r.get('curve') for r in main):
        print(f'[reproduce] {out_dir / "curves.png"} kept: some runs\' curves are not in runs.csv', flush=True)
    else:
        fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups)), squeeze=False)
        for gi, group in enumerate(groups):
            for r in (r for r in main if r['group'] == group and r.get('curve')):
                ep, err, loss = zip(*r['curve'])
                style = dict(color=colors[r['method']], ls='-' if r['seed'] == first_seed else '--', alpha=0.85,
                             label=f'{METHOD_LABELS[r["method"]]} s{r["seed"]}', marker='o', markersize=3)
                axes[gi, 0].plot(ep, err, **style)
                axes[gi, 1].plot(ep, loss, **style)
            axes[gi, 0].set(xlabel='epoch', ylabel='test error (%)', title=f'{group}: test error')
            axes[gi, 1].set(xlabel='epoch', ylabel='train loss (on its own targets)', title=f'{group}: train loss')
        _save(fig, out_dir / 'curves.png', legend_size=7)
    if any('white-box/pgd' in r and not r.get('pgd_curve') for r in main):
        print(f'[reproduce] {out_dir / "eps.png"} kept: some runs\' PGD-vs-eps values are not in runs.csv', flush=True)
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for method in METHODS:
            curves = [{float(e): v for e, v in r['pgd_curve'].items()} for r in main
                      if r['group'] == group and r['method'] == method and r.get('pgd_curve')]
            if curves:
                eps = sorted(curves[0])
                ax.plot(eps, [sum(c[e] for c in curves) / len(curves) for e in eps], 'o-', color=colors[method],
                        label=f'{METHOD_LABELS[method]} (n={len(curves)})')
        ax.set(xlabel='L-inf radius eps (x/255)', ylabel='top-1 error (%)', ylim=(0, 100),
               title=f'{group}: white-box PGD-10')
    _save(fig, out_dir / 'eps.png', legend_size=8)


def _save(fig, path: Path, legend_size: int) -> None:
    """Grid and legend on every axis that has something to label, then write and close the figure."""
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
