"""
Reporting a sweep over an item or prompt set (sets.py): one score per item and setting, means
over items with bootstrap confidence intervals by split, differences from the plain model
paired by item, and settings tuned on the development split and reported on the test split.

  item_rows     items.csv: one row per setting and item (its seeds averaged)
  bootstrap     mean and 95% interval, resampling units (a document's questions together)
  set_summary   summary.csv: one row per grid point and split
  tuned         per method, the point best on dev, reported on test
  set_text      summary.txt;  plot_set  set.png
"""

import math
import os

import numpy as np

from files import write_whole
from report import METHOD_COLOURS, csv_text, plot_setup, save_png, wrapped

BOOTSTRAP_SAMPLES = 2000
# per metric: the score settings are tuned by (first), and the others summarized; TEXT_SCORES: summary.txt's
SET_SCORES = dict(answer=['answer_prob', 'answer_top1', 'answer_logprob'],
                  recall=['success', 'answer_prob', 'answer_top1', 'answer_logprob'],
                  vader=['positive', 'afinn_positive', 'judges_agree', 'compound', 'copy_rate', 'perplexity',
                         'distinct_2'])
TEXT_SCORES = dict(answer=SET_SCORES['answer'], recall=SET_SCORES['recall'][:3],
                   vader=['positive', 'afinn_positive', 'judges_agree', 'copy_rate', 'perplexity'])
NAMES = dict(answer_prob='p(answer)', answer_top1='answer is top-1', answer_logprob='log p(answer)',
             success='sampled recall', positive='VADER positive', afinn_positive='AFINN positive',
             judges_agree='judges agree', compound='VADER compound', copy_rate='copy rate', perplexity='perplexity',
             distinct_2='distinct-2')


def _mean(vals):
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float('nan')


def item_scores(metric, rec):
    """One item's scores from its setting record: the answers' probability (teacher-forced),
    the share of seeds that recall, or the seeds' mean sentiment of both judges, their agreement,
    the copy rate and text quality."""
    out = {}
    if metric in ('answer', 'recall'):
        a = rec['answer_scores']
        out.update(answer_prob=a['answer_prob'], answer_top1=float(a['answer_top1']), answer_logprob=a['answer_logprob'])
    rows = [r['scores'] for r in rec['rows']]
    if metric == 'recall':
        out['success'] = _mean([s['success'] for s in rows])
    if metric == 'vader':
        out.update(positive=_mean([s['positive'] for s in rows]), compound=_mean([s['compound'] for s in rows]),
                   afinn_positive=_mean([float(s['afinn'] > 0) for s in rows]),
                   judges_agree=_mean([float(s['positive'] == (s['afinn'] > 0)) for s in rows]),
                   copy_rate=_mean([s['copy_rate'] for s in rows]),
                   perplexity=float(np.nanmedian([s['perplexity'] for s in rows])) if rows else float('nan'),
                   distinct_2=_mean([s['distinct_2'] for s in rows]))
    return out


def item_rows(metric, settings, finished):
    """One row per finished setting of a set sweep: its grid point (group), item, split, unit, scores."""
    rows = []
    for s in settings:
        rec = finished.get(s['id'])
        if rec is not None:
            rows.append(dict(group=s['group'], label=s['label'], method=s['method'], item=s['item'], split=s['split'],
                             unit=s['unit'], kind=s.get('kind') or '', setting_id=s['id'], **item_scores(metric, rec)))
    return rows


def bootstrap(values, units, samples=BOOTSTRAP_SAMPLES, seed=0):
    """(mean, lo, hi): the mean of values and its 95% percentile interval, resampling whole
    units with replacement (items of one document are not independent). NaNs are left out."""
    values, units = np.asarray(values, dtype=float), np.asarray(units)
    keep = ~np.isnan(values)
    values, units = values[keep], units[keep]
    if not len(values):
        return float('nan'), float('nan'), float('nan')
    names, inverse = np.unique(units, return_inverse=True)
    sums, counts = np.bincount(inverse, values), np.bincount(inverse)
    idx = np.random.default_rng(seed).integers(0, len(names), (samples, len(names)))
    stats = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(values.mean()), float(lo), float(hi)


def set_summary(metric, rows):
    """One row per grid point and split (kind ''), and per grid point, split and kind where the
    items have kinds: items, units, each score's mean and interval, and the first score's
    difference from the plain model on the same items (paired, same bootstrap)."""
    cols = SET_SCORES[metric]
    plain = {r['item']: r for r in rows if r['method'] == 'plain'}
    out = []
    groups = list(dict.fromkeys((r['group'], r['split'], k) for r in rows for k in dict.fromkeys(['', r['kind']])))
    for group, split, kind in sorted(groups, key=lambda g: (g[1] != 'dev', g[2] != '', groups.index(g))):
        rs = [r for r in rows if r['group'] == group and r['split'] == split and kind in ('', r['kind'])]
        row = dict(group=group, label=rs[0]['label'], method=rs[0]['method'], split=split, kind=kind, items=len(rs),
                   units=len({r['unit'] for r in rs}))
        for c in cols:
            row[c], row[f'{c}_lo'], row[f'{c}_hi'] = bootstrap([r[c] for r in rs], [r['unit'] for r in rs])
        paired = [r for r in rs if r['item'] in plain]
        if plain and rs[0]['method'] != 'plain' and paired:
            c = cols[0]
            row['vs_plain'], row['vs_plain_lo'], row['vs_plain_hi'] = bootstrap(
                [r[c] - plain[r['item']][c] for r in paired], [r['unit'] for r in paired])
        out.append(row)
    return out


def family(settings_by_group, group):
    """Which settings compete when tuning: a method, and for the memory its mode and set memory."""
    s = settings_by_group[group]
    c = s['config']
    store = f"set_memory={c['set_memory']}" if s['method'] != 'plain' and c['set_memory'] != 'item' and \
        s.get('copy_source') == '' and c['metric'] != 'vader' else ''
    if s['method'] == 'memory':
        return f"memory ({', '.join(filter(None, [c['memory_mode'], store]))})"
    return s['method'] + (f" ({store})" if store else '')


FLUENCY_LIMIT = 2.0  # sentiment: tuned again among the settings whose dev perplexity is at most this x plain's


def tuned(metric, summary, settings, fluency=False):
    """Per family, the grid point with the best development mean of the first score, with its
    development and test rows: (family, dev row, test row or None). fluency=True (sentiment):
    only among grid points whose median perplexity on dev is at most FLUENCY_LIMIT times the
    plain model's, so that a setting that parrots the memory is not chosen for its score."""
    by_group = {s['group']: s for s in settings if s.get('group')}
    first, out = SET_SCORES[metric][0], []
    plain = next((r['perplexity'] for r in summary if r['method'] == 'plain' and r['split'] == 'dev' and not r['kind']),
                 None) if fluency else None
    fams = {}
    for r in summary:
        if r['split'] == 'dev' and not r['kind'] and (plain is None or r['perplexity'] <= FLUENCY_LIMIT * plain):
            fams.setdefault(family(by_group, r['group']), []).append(r)
    for fam, dev in fams.items():
        best = max(dev, key=lambda r: -math.inf if math.isnan(r[first]) else r[first])
        test = next((r for r in summary if r['group'] == best['group'] and r['split'] == 'test' and not r['kind']), None)
        out.append((fam, best, test))
    return out


def _cell(r, c):
    if r is None or c not in r or math.isnan(r[c]):
        return '-'
    fmt = '.1f' if c == 'perplexity' else '.3f' if c != 'answer_prob' else '.4f'
    return f"{r[c]:{fmt}} [{r[c + '_lo']:{fmt}}, {r[c + '_hi']:{fmt}}]"


def set_text(metric, summary, settings, n_done, n_settings):
    """summary.txt: every grid point by split, then the tuned comparison."""
    cols = TEXT_SCORES[metric]
    w = min(max([30] + [len(r['label']) for r in summary]), 56)
    lines = []
    for split in ('dev', 'test'):
        rs = [r for r in summary if r['split'] == split and not r['kind']]
        if not rs:
            continue
        head = f"{split + ' split':<{w}} {'items':>5} " + ' '.join(f"{NAMES[c]:>24}" for c in cols) + \
            f" {'vs plain (' + NAMES[cols[0]] + ')':>30}"
        lines += [head, '-' * len(head)]
        for r in rs:
            label = r['label'] if len(r['label']) <= w else r['label'][:w - 3] + '...'
            lines.append(f"{label:<{w}} {r['items']:>5} " + ' '.join(f"{_cell(r, c):>24}" for c in cols) +
                         f" {_cell(r, 'vs_plain') if 'vs_plain' in r else '-':>30}")
        lines.append('')
    kinds = list(dict.fromkeys(r['kind'] for r in summary if r['kind']))
    for split in ('dev', 'test') if kinds else ():
        rs = [r for r in summary if r['split'] == split and r['kind']]
        if not rs:
            continue
        head = f"{split + ' split, ' + NAMES[cols[0]]:<{w}} " + ' '.join(f"{k:>24}" for k in kinds)
        lines += [head, '-' * len(head)]
        for label in dict.fromkeys(r['label'] for r in rs):
            by = {r['kind']: r for r in rs if r['label'] == label}
            lines.append(f"{label[:w]:<{w}} " + ' '.join(f"{_cell(by.get(k), cols[0]):>24}" for k in kinds))
        lines.append('')
    for fluency in (False, True) if metric == 'vader' else (False,):
        best = tuned(metric, summary, settings, fluency)
        if not best or all(t is None for _, _, t in best):
            continue
        c = cols[0]
        lines.append(f"tuned on the dev split by {NAMES[c]}" + (f", among settings whose dev perplexity is at most "
                                                                  f"{FLUENCY_LIMIT:g}x the plain model's" if fluency else '')
                     + ", reported on the test split" + (" (with copy rate and perplexity)" if metric == 'vader' else '')
                     + ":")
        for fam, dev, test in best:
            extra = f"   copy {_cell(test, 'copy_rate')}   ppl {_cell(test, 'perplexity')}" if metric == 'vader' else ''
            lines.append(f"  {fam:<28} {dev['label'][:w]:<{w}} dev {_cell(dev, c):>24}   test {_cell(test, c):>24}"
                         + (f"   vs plain {_cell(test, 'vs_plain')}" if test and 'vs_plain' in test else '') + extra)
        lines.append('')
    if n_done < n_settings:
        lines.append(f"({n_settings - n_done} of {n_settings} item settings not finished yet)")
    lines.append("means over items with 95% bootstrap intervals (whole documents or prompts resampled, "
                 f"{BOOTSTRAP_SAMPLES} times); vs plain: the difference from the plain model on the same items")
    return '\n'.join(lines) + '\n'


def plot_set(path, metric, summary, title):
    """One panel per score: each grid point's mean and interval, dev (open) and test (filled)."""
    plt = plot_setup()
    cols = SET_SCORES[metric][:3 if metric == 'vader' else 2]
    summary = [r for r in summary if not r['kind']]
    labels = list(dict.fromkeys(r['label'] for r in summary))
    width = min(max(6.0, 0.35 * len(labels) + 2.5), 16.0)
    fig, axes = plt.subplots(len(cols), 1, figsize=(width, 2.6 * len(cols) + 1.2), sharex=True)
    axes = np.atleast_1d(axes)
    x = np.arange(len(labels))
    for ax, c in zip(axes, cols):
        for split, dx, fill in (('dev', -0.15, 'none'), ('test', 0.15, None)):
            for r in (r for r in summary if r['split'] == split and not math.isnan(r[c])):
                xi = labels.index(r['label']) + dx
                col = METHOD_COLOURS[r['method']]
                ax.errorbar(xi, r[c], yerr=[[r[c] - r[c + '_lo']], [r[c + '_hi'] - r[c]]], fmt='o', ms=4, color=col,
                            mfc=fill or col, capsize=2, lw=1)
        ax.set_ylabel(NAMES[c], fontsize=9)
        ax.grid(axis='y', alpha=0.3)
    axes[-1].set_xticks(x, labels, rotation=90 if len(labels) > 8 else 30, ha='right' if len(labels) <= 8 else 'center',
                        fontsize=7)
    axes[-1].set_xlabel('open: dev split, filled: test split; bars: 95% bootstrap intervals over items', fontsize=8)
    axes[0].set_title(wrapped(title, width), fontsize=9)
    save_png(fig, path)
    plt.close(fig)


def write_set_outputs(out_dir, config, settings, finished, title):
    """items.csv, summary.csv, summary.txt and set.png of a set sweep. Returns (summary, text, plots)."""
    metric = config['metric']
    rows = item_rows(metric, settings, finished)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    write_whole(os.path.join(out_dir, 'items.csv'), csv_text(cols, rows))
    summary = set_summary(metric, rows)
    write_whole(os.path.join(out_dir, 'summary.csv'), csv_text(list(dict.fromkeys(k for r in summary for k in r)), summary))
    text = set_text(metric, summary, settings, len(rows), len(settings))
    write_whole(os.path.join(out_dir, 'summary.txt'), text)
    plots = []
    if config['plots'] and summary:
        plots = [os.path.join(out_dir, 'set.png')]
        plot_set(plots[0], metric, summary, title)
    return summary, text, plots
