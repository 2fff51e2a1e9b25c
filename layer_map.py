"""
Which layers do what: a sentiment layer scan and a recall layer scan in one picture.

    python layer_map.py --sentiment=docs/smollm2/sentiment_layers --recall=docs/smollm2/recall_layers --out=docs/smollm2/layer_map.png

Reads the summary.csv of two finished sweeps whose memory settings each use one layer
(config/sweep_smollm2_sentiment_layers.py, config/sweep_smollm2_recall_layers.py) and draws,
per layer: the median VADER compound of the continuations (with the interquartile range as a
band), the fraction of positive continuations and the recall successes (each with its 95%
Wilson interval as a band); the baselines of
each sweep (plain, context, the best activation addition) are horizontal lines. Either scan
may be left out.
"""

import csv
import json
import os
import sys

from configurator import UserError, answer_help, configure, run_cli

DEFAULTS = dict(
    sentiment='',          # output folder of a sentiment layer scan (summary.csv); '' = none
    recall='',             # output folder of a recall layer scan (summary.csv); '' = none
    out='',                # the PNG to write; '' = layer_map.png in the first folder given
    title='',              # the figure's title; '' = the model and the scans' sizes (from their sweep.json)
)
if __name__ == '__main__':  # --help answers here, before torch and FAISS are imported (seconds)
    answer_help(DEFAULTS, __doc__, [__file__])

from report import METHOD_COLOURS, plot_setup, save_png
from scores import wilson_interval


def read_summary(folder):
    path = os.path.join(folder, 'summary.csv')
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; run the sweep first (python sweep.py config/...)")
    numbers = ('seeds', 'compound_median', 'compound_q25', 'compound_q75', 'frac_positive', 'successes')
    try:
        with open(path, encoding='utf-8', newline='') as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r['setting'] = json.loads(r['setting']) if r.get('setting') else {}
            if not isinstance(r['setting'], dict) or r.get('method') is None:
                raise ValueError('a row without its method or setting')
            for key in numbers:
                if r.get(key) not in (None, ''):
                    float(r[key])
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} is not a sweep's summary ({str(e)[:80]}); run the sweep again") from None
    return rows


def read_sweep(folder):
    """The scan's sweep.json (its model, seeds, tokens and answers), or {} for a folder without one."""
    path = os.path.join(folder, 'sweep.json')
    if not os.path.isfile(path):
        return {}
    with open(path, encoding='utf-8') as f:
        try:
            sweep = json.load(f)
            return dict(model=sweep['config']['init_from'], seeds=len(sweep['seeds']),
                        tokens=sweep['config']['max_new_tokens'], answers=sweep['config'].get('answers'))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a sweep record sweep.py wrote") from None


def default_title(config):
    """'<model>: the memory at one layer at a time (sentiment: n seeds x t tokens; recall: n seeds)'."""
    scans = {kind: read_sweep(config[kind]) for kind in ('sentiment', 'recall') if config[kind]}
    models = {s['model'] for s in scans.values() if s}
    sizes = [f"{kind}: {s['seeds']} seeds" + (f" x {s['tokens']} tokens" if kind == 'sentiment' else '')
             for kind, s in scans.items() if s]
    return (f"{', '.join(sorted(models))}: " if models else '') + 'the memory at one layer at a time' + \
        (f" ({'; '.join(sizes)})" if sizes else '')


def interval_band(ax, xs, ks, n, scale):
    """The 95% Wilson interval of k of n successes at each x, shaded."""
    lo, hi = zip(*(wilson_interval(k, n) for k in ks))
    ax.fill_between(xs, [scale * v for v in lo], [scale * v for v in hi], color=METHOD_COLOURS['memory'], alpha=0.15,
                    lw=0, label='memory at this layer: 95% interval')


def by_layer(rows):
    """{layer: row} for the memory settings that use exactly one layer."""
    out = {}
    for r in rows:
        knn = r['setting'].get('knn_num')
        if r['method'] == 'memory' and knn and sum(1 for k in knn if k) == 1:
            out[next(i for i, k in enumerate(knn) if k)] = r
    if not out:
        raise UserError("the sweep has no single-layer memory settings (grid over knn_num, one layer each)")
    return out


def baselines(rows, key):
    """(label, value, method) of the baselines: plain, context and the best actadd by `key`."""
    lines = [(r['label'], float(r[key]), r['method']) for r in rows if r['method'] in ('plain', 'context')]
    act = [r for r in rows if r['method'] == 'actadd']
    if act:
        best = max(act, key=lambda r: float(r[key]))
        lines.append((f"best of {len(act)} ActAdd: {best['label'].removeprefix('actadd ')}", float(best[key]), 'actadd'))
    return lines


def draw_baselines(ax, lines, scale=1.0):
    styles = dict(plain=':', context='--', actadd='-.')
    for label, value, method in lines:
        ax.axhline(value * scale, color=METHOD_COLOURS[method], ls=styles[method], lw=1.3, label=label)


def main(argv):
    config = configure(DEFAULTS, argv, __doc__, [sys.modules[__name__]])
    if not config['sentiment'] and not config['recall']:
        raise UserError("give --sentiment=FOLDER and/or --recall=FOLDER (finished layer scans)")
    panels = []
    if config['sentiment']:
        rows = read_summary(config['sentiment'])
        panels += [('compound', rows), ('positive', rows)]
    if config['recall']:
        panels.append(('recall', read_summary(config['recall'])))
    plt = plot_setup()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 2.3 * len(panels) + 0.8), sharex=True, squeeze=False)
    n_layer = 0
    for ax, (kind, rows) in zip(axes[:, 0], panels):
        layers = by_layer(rows)
        xs = sorted(layers)
        n_layer = max(n_layer, max(xs) + 1)
        n = int(next(iter(layers.values()))['seeds'])
        if kind == 'compound':
            med = [float(layers[i]['compound_median']) for i in xs]
            ax.fill_between(xs, [float(layers[i]['compound_q25']) for i in xs],
                            [float(layers[i]['compound_q75']) for i in xs], color=METHOD_COLOURS['memory'], alpha=0.2,
                            label='memory at this layer: IQR')
            ax.plot(xs, med, 'o-', color=METHOD_COLOURS['memory'], ms=4, label='memory at this layer: median')
            draw_baselines(ax, baselines(rows, 'compound_median'))
            ax.set_ylim(-1.05, 1.05)
            ax.set_ylabel(f'VADER compound\n(median, n={n})', fontsize=9)
        elif kind == 'positive':
            ks = [round(n * float(layers[i]['frac_positive'])) for i in xs]
            interval_band(ax, xs, ks, n, 100)
            ax.plot(xs, [100 * k / n for k in ks], 'o-', color=METHOD_COLOURS['memory'], ms=4,
                    label='memory at this layer')
            draw_baselines(ax, baselines(rows, 'frac_positive'), 100)
            ax.set_ylim(0, 100)
            ax.set_ylabel(f'positive\ncontinuations (%, n={n})', fontsize=9)
        else:
            ks = [int(layers[i]['successes']) for i in xs]
            interval_band(ax, xs, ks, n, n)
            ax.plot(xs, ks, 'o-', color=METHOD_COLOURS['memory'], ms=4, label='memory at this layer')
            draw_baselines(ax, baselines(rows, 'successes'))
            ax.set_ylim(0, n)
            answers = read_sweep(config['recall']).get('answers')
            said = ' or '.join(repr(a) for a in answers) if answers else 'the answer'
            ax.set_ylabel(f'recall: seeds (of {n})\nthat start with {said}', fontsize=9)
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel('the memory\'s layer (0-based; the write-up counts from 1)')
    axes[-1, 0].set_xticks(range(0, n_layer, 2 if n_layer > 16 else 1))
    axes[0, 0].set_title(config['title'] or default_title(config), fontsize=10)
    out = config['out'] or os.path.join(config['sentiment'] or config['recall'], 'layer_map.png')
    save_png(fig, out)
    print(f"wrote {out}")


if __name__ == '__main__':
    run_cli(main)
