"""
Reporting a sweep: results.csv, samples.jsonl, summary.csv and summary.txt, the plots (one
function per plot), and Weights & Biases logging. Everything is rewritten whole from the
finished settings, so the files always agree with each other.
"""

import io
import json
import math
import os

import numpy as np

from configurator import UserError
from files import write_whole
from scores import JUDGE_SCORES, QUALITY_SCORES, VADER_SCORES, summarize, wilson_interval

# columns of results.csv besides the grid keys
CORE_COLUMNS = ['init_from', 'knn_num', 'mem_frac', 'bookkeeping_frac', 'knn_softmax_influence', 'resid_only',
                'resid_frac', 'remove_bookkeeping_token_mem_size', 'decoding', 'temperature', 'top_k',
                'max_new_tokens', 'dtype']
ANSWER_COLUMNS = ('answer', 'answer_logprob', 'answer_prob', 'answer_top1')  # run.answer_scores, recall sweeps
# the write-up's colours
COLOURS = dict(compound='tab:green', pos='tab:orange', neg='tab:red', neu='tab:blue')


def jsonable(v):
    """v as JSON can hold it: tuples become lists, a tuple of keys becomes 'key1+key2'."""
    if isinstance(v, dict):
        return {str(k) if not isinstance(k, tuple) else '+'.join(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def csv_text(columns, rows):
    import csv
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(columns)
    for r in rows:
        w.writerow(['' if r.get(c) is None else json.dumps(r[c]) if isinstance(r.get(c), (list, dict, bool))
                    else r[c] for c in columns])
    return buf.getvalue()


def finished_rows(settings, finished):
    """(setting, row) for every seed's row of the finished settings, in setting order."""
    for s in settings:
        for r in finished[s['id']]['rows'] if s['id'] in finished else []:
            yield s, r


def result_table(metric, settings, finished):
    """results.csv: one row per finished setting and seed (metric 'answer': per setting), the
    setting's values (and item, in a set sweep) and the scores."""
    grid_cols = list(dict.fromkeys(k for s in settings for k in s['values']))
    items = ['item', 'split'] if any(s.get('item') for s in settings) else []
    cols = ['setting_index', 'setting_id', 'label', 'method'] + items + (['seed'] if metric != 'answer' else []) + \
        grid_cols + [c for c in CORE_COLUMNS if c not in grid_cols]
    judges = [c for c in JUDGE_SCORES if any(c in r['scores'] for _, r in finished_rows(settings, finished))]
    score_cols = list(ANSWER_COLUMNS) if metric == 'answer' else \
        (VADER_SCORES + ['positive'] + judges if metric == 'vader' else ['success', 'answer']) + QUALITY_SCORES
    rows = []
    pairs = [(s, None) for s in settings if s['id'] in finished] if metric == 'answer' else finished_rows(settings, finished)
    for s, r in pairs:
        row = dict(setting_index=s['index'], setting_id=s['id'], label=s['label'], method=s['method'],
                   **({c: s.get(c) for c in items}), **(dict(seed=r['seed']) if r else {}))
        for c in grid_cols + CORE_COLUMNS:
            row.setdefault(c, s['columns'].get(c))
        row.update({c: r['scores'].get(c) for c in score_cols} if r else
                   {c: finished[s['id']]['answer_scores'][c] for c in score_cols})
        rows.append(row)
    return cols + score_cols, rows




def summary_table(metric, settings, finished):
    """summary.csv: one row per finished setting (scores.summarize)."""
    rows = []
    for s in settings:
        rec = finished.get(s['id'])
        if rec is not None:
            answer = {k: rec['answer_scores'][k] for k in ANSWER_COLUMNS} if rec.get('answer_scores') else {}
            rows.append(dict(setting_index=s['index'], setting_id=s['id'], label=s['label'], method=s['method'],
                             setting=s['setting'], **summarize(metric, rec['rows']), **answer))
    return rows


def summary_text(metric, summary, n_settings):
    """summary.txt: the summary as a table for the terminal."""
    w = min(max([34 if metric == 'vader' else 40] + [len(r['label']) for r in summary]), 64)  # the label column
    if metric == 'answer':
        head = f"{'setting':<{w}} {'answer':>16} {'p(answer)':>10} {'log p':>8} {'top1':>4}"
    elif metric == 'vader':
        head = f"{'setting':<{w}} {'seeds':>5} {'compound med (IQR)':>19} {'mean':>6} {'pos':>5} {'neu':>5} " \
               f"{'neg':>5} {'%pos':>5} {'dist-1/2/3':>14} {'ppl med':>8}"
    else:
        head = f"{'setting':<{w}} {'successes':>12} {'p(answer)':>10} {'top1':>4} {'dist-1/2/3':>14} {'ppl med':>8}"
    lines = [head, '-' * len(head)]
    for r in summary:
        label = r['label'] if len(r['label']) <= w else r['label'][:w - 3] + '...'
        if metric == 'answer':
            lines.append(f"{label:<{w}} {r['answer'][:16]:>16} {r['answer_prob']:>10.2e} {r['answer_logprob']:>8.2f} "
                         f"{r['answer_top1']:>4}")
            continue
        dist = '/'.join(f"{r[f'distinct_{n}_mean']:.2f}" for n in (1, 2, 3))
        if metric == 'vader':
            lines.append(f"{label:<{w}} {r['seeds']:>5} {r['compound_median']:>8.3f} ({r['compound_iqr']:.3f})  "
                         f"{r['compound_mean']:>6.3f} {r['pos_median']:>5.2f} {r['neu_median']:>5.2f} "
                         f"{r['neg_median']:>5.2f} {100 * r['frac_positive']:>5.0f} {dist:>14} {r['perplexity_median']:>8.1f}")
        else:
            p = f"{r['answer_prob']:.2e}" if 'answer_prob' in r else '-'
            top = str(r['answer_top1']) if 'answer_top1' in r else '-'
            lines.append(f"{label:<{w}} {r['successes']:>5} / {r['seeds']:<4} {p:>10} {top:>4} {dist:>14} "
                         f"{r['perplexity_median']:>8.1f}")
    if len(summary) < n_settings:
        lines.append(f"({n_settings - len(summary)} of {n_settings} settings not finished yet)")
    if metric == 'answer':
        lines.append("p(answer) = the best answer's probability after the prompt, teacher-forced (temperature 1); "
                     "top1 = its first token is the most likely next token")
    elif metric == 'vader':
        lines.append("medians of VADER scores of the continuation; %pos = compound >= 0.05; dist = mean distinct-n "
                     "of tokens; ppl = perplexity under the plain model")
    else:
        lines.append("successes = seeds whose continuation starts with an answer; p(answer) = the best answer's "
                     "probability, teacher-forced (temperature 1); top1 = its first token is the most likely next "
                     "token; dist = mean distinct-n of tokens; ppl = perplexity under the plain model")
    return '\n'.join(lines) + '\n'


def save_png(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=150, bbox_inches='tight')
    write_whole(path, buf.getvalue())


def plot_setup():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


# how each method's settings are drawn, and what the legends call them
METHOD_COLOURS = dict(plain='tab:gray', context='tab:olive', actadd='tab:purple', memory='tab:blue')
METHOD_NAMES = dict(plain='plain model (prompt alone)', context='memory text in the context', actadd='activation addition',
                    memory='the memory method')
MANY = 12  # more settings than this: medians with intervals instead of boxes, labels upright
LAYERS_NOTE = 'layers 0-based (the write-up counts from 1: its layer 10 is layer 9 here)'


def setting_axis(ax, done, n_seeds=True):
    """x positions of the finished settings, their labels set as ticks (with n = seeds, said
    once below the axis when every setting has the same n)."""
    x = np.arange(len(done))
    counts = {len(rec['rows']) for _, rec in done}
    each = n_seeds and len(counts) > 1
    labels = [s['label'] + (f"\n(n={len(rec['rows'])})" if each else '') for s, rec in done]
    many = len(done) > 4
    ax.set_xticks(x, labels, rotation=(90 if len(done) > MANY else 40) if many else 0,
                  ha='right' if 4 < len(done) <= MANY else 'center', fontsize=7 if len(done) > MANY else 8)
    ax.set_xlim(-0.6, len(done) - 0.4)
    notes = ([f"n = {counts.pop()} seeds per setting"] if n_seeds and not each else []) + \
        ([LAYERS_NOTE] if any('layer' in s['label'] for s, _ in done) else [])
    if notes:
        ax.set_xlabel('; '.join(notes), fontsize=8)
    return x


def figure_width(done):
    return min(max(5.0, 0.55 * len(done) + 1.5), 9.0) if len(done) <= MANY else min(0.22 * len(done) + 2.5, 16.0)


def wrapped(title, width):
    import textwrap
    return '\n'.join(textwrap.wrap(title, int(width * 13)))


def plot_vader(path, done, title, parts=('compound',)):
    """The VADER scores of each setting's continuations (compound by default; `parts` adds
    pos, neg, neu). Up to MANY settings: a box per setting (no fliers) with every seed a dot;
    more (a layer scan): the median with its interquartile range. One part: colours are the
    methods; several: colours are the parts."""
    plt = plot_setup()
    from matplotlib.patches import Patch
    width = figure_width(done) * (1 + 0.3 * (len(parts) - 1) * (len(done) <= MANY))
    fig, ax = plt.subplots(figsize=(width, 4.2))
    x = setting_axis(ax, done)
    w = 0.8 / len(parts)
    rng = np.random.default_rng(0)  # fixed jitter: the plot is the same every time
    for j, c in enumerate(parts):
        data = [[r['scores'][c] for r in rec['rows']] for _, rec in done]
        pos = x - 0.4 + w * (j + 0.5)
        colours = [COLOURS[c] if len(parts) > 1 else METHOD_COLOURS[s['method']] for s, _ in done]
        if len(done) <= MANY:
            bp = ax.boxplot(data, positions=pos, widths=w * 0.85, patch_artist=True, manage_ticks=False,
                            showfliers=False)
            for box, col in zip(bp['boxes'], colours):
                box.set_facecolor(col)
                box.set_alpha(0.35)
            for med in bp['medians']:
                med.set_color('black')
            for xi, d, col in zip(pos, data, colours):
                ax.scatter(xi + rng.uniform(-w * 0.3, w * 0.3, len(d)), d, s=7, color=col, alpha=0.7,
                           linewidths=0, zorder=3)
        else:
            q25, med, q75 = (np.array([np.percentile(d, q) for d in data]) for q in (25, 50, 75))
            for xi, lo, m, hi, col in zip(pos, q25, med, q75, colours):
                ax.errorbar(xi, m, yerr=[[m - lo], [hi - m]], fmt='o', ms=4, color=col, capsize=2, lw=1.2)
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0, color='grey', lw=0.5)
    shown = 'box: quartiles, dots: seeds' if len(done) <= MANY else 'dot: median, bar: 25%-75%'
    ax.set_ylabel(f"VADER {'compound' if parts == ('compound',) else 'scores'} of the continuation\n({shown})",
                  fontsize=9)
    if len(parts) > 1:
        names = dict(compound='compound', pos='positive', neg='negative', neu='neutral')
        ax.legend([Patch(color=COLOURS[c], alpha=0.6) for c in parts], [names[c] for c in parts],
                  loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=8)
    else:
        method_legend(ax, done)
    ax.grid(axis='y', alpha=0.3)
    ax.set_title(wrapped(title, width), fontsize=9)
    save_png(fig, path)
    plt.close(fig)


def method_legend(ax, done, extra=()):
    from matplotlib.patches import Patch
    methods = list(dict.fromkeys(s['method'] for s, _ in done))
    ax.legend([Patch(color=METHOD_COLOURS[m]) for m in methods] + [h for h, _ in extra],
              [METHOD_NAMES[m] for m in methods] + [label for _, label in extra], fontsize=8,
              loc='upper left', bbox_to_anchor=(1.0, 1.0))


def answers_label(done):
    answers = next((s['answers'] for s, _ in done if s.get('answers')), None)
    return ' or '.join(repr(a) for a in answers) if answers else 'an answer'


def plot_recall(path, done, title):
    """Bars: seeds whose continuation starts with an answer, per setting, coloured by method,
    with 95% Wilson intervals; the axis ends at the number of seeds."""
    plt = plot_setup()
    from matplotlib.ticker import MaxNLocator
    width = figure_width(done)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    x = setting_axis(ax, done, n_seeds=False)
    succ = [sum(r['scores']['success'] for r in rec['rows']) for _, rec in done]
    n = [len(rec['rows']) for _, rec in done]
    bars = ax.bar(x, succ, color=[METHOD_COLOURS[s['method']] for s, _ in done])
    ci = [wilson_interval(k, m) for k, m in zip(succ, n)]
    ax.errorbar(x, succ, yerr=[[k - lo * m for k, m, (lo, _) in zip(succ, n, ci)],
                               [hi * m - k for k, m, (_, hi) in zip(succ, n, ci)]],
                fmt='none', ecolor='black', capsize=3, lw=1)
    for b, m, (_, hi) in zip(bars, n, ci):
        ax.annotate(f"{round(b.get_height())}/{m}", (b.get_x() + b.get_width() / 2, hi * m), xytext=(0, 2),
                    textcoords='offset points', ha='center', va='bottom', fontsize=7, annotation_clip=False)
    ax.set_ylim(0, max(n))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.set_ylabel(f"seeds (of {max(n)}) that start with\n{answers_label(done)}", fontsize=8)
    from matplotlib.lines import Line2D
    method_legend(ax, done, [(Line2D([], [], color='black', lw=1, marker='|'), '95% interval (Wilson)')])
    ax.grid(axis='y', alpha=0.3)
    ax.set_title(wrapped(title, width), fontsize=9)
    save_png(fig, path)
    plt.close(fig)


def plot_answer(path, done, title):
    """Bars: the best answer's probability after the prompt (teacher-forced), per setting,
    coloured by method, on a log axis (it spans orders of magnitude)."""
    plt = plot_setup()
    width = figure_width(done)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    x = setting_axis(ax, done, n_seeds=False)
    p = [rec['answer_scores']['answer_prob'] for _, rec in done]
    ax.bar(x, p, color=[METHOD_COLOURS[s['method']] for s, _ in done])
    ax.set_yscale('log')
    ax.set_ylabel(f"p({answers_label(done)})\nafter the prompt", fontsize=8)
    method_legend(ax, done)
    ax.grid(axis='y', alpha=0.3)
    ax.set_title(wrapped(title, width), fontsize=9)
    save_png(fig, path)
    plt.close(fig)


def plot_quality(path, done, title):
    """Two stacked panels per setting: perplexity under the plain model (box per setting,
    every seed a dot) and mean distinct-1/2/3 (hatching tells n apart; colour is the method
    in both panels)."""
    plt = plot_setup()
    from matplotlib.patches import Patch
    width = figure_width(done) * 1.2
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(width, 6.4), sharex=True, gridspec_kw=dict(hspace=0.08))
    x = np.arange(len(done))
    colours = [METHOD_COLOURS[s['method']] for s, _ in done]
    ppl = [[r['scores']['perplexity'] for r in rec['rows'] if not math.isnan(r['scores']['perplexity'])]
           for _, rec in done]
    a1.boxplot(ppl, positions=x, widths=0.6, showfliers=False, manage_ticks=False, medianprops=dict(color='black'))
    rng = np.random.default_rng(0)
    for xi, p, col in zip(x, ppl, colours):
        a1.scatter(xi + rng.uniform(-0.18, 0.18, len(p)), p, s=7, alpha=0.6, linewidths=0, color=col, zorder=3)
    flat = [v for p in ppl for v in p]
    if flat and min(flat) > 0 and max(flat) / min(flat) > 20:
        a1.set_yscale('log')
    a1.set_ylabel('perplexity\n(under the plain model)', fontsize=9)
    method_legend(a1, done)
    w = 0.8 / 3
    hatches = ('', '///', 'xxx')
    for j, nn in enumerate((1, 2, 3)):
        means = [np.nanmean([r['scores'][f'distinct_{nn}'] for r in rec['rows']]) for _, rec in done]
        a2.bar(x - 0.4 + w * (j + 0.5), means, width=w * 0.9, color=colours, alpha=0.35 + 0.2 * j,
               hatch=hatches[j], edgecolor='white', lw=0)
    a2.set_ylim(0, 1.0)
    a2.set_ylabel('mean distinct-n\n(of tokens)', fontsize=9)
    a2.legend([Patch(facecolor='lightgrey', alpha=0.35 + 0.2 * j, hatch=h, edgecolor='black', lw=0)
               for j, h in enumerate(hatches)], [f'distinct-{nn}' for nn in (1, 2, 3)],
              fontsize=8, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    setting_axis(a2, done)
    a1.set_title(wrapped(title + ' - text quality', width), fontsize=9)
    save_png(fig, path)
    plt.close(fig)


def make_plots(out_dir, metric, settings, finished, title, vader_parts=('compound',)):
    """vader.png or recall.png, and quality.png, for the finished settings. Returns their paths."""
    done = [(s, finished[s['id']]) for s in settings if s['id'] in finished]
    if not done:
        return []
    paths = [os.path.join(out_dir, 'vader.png' if metric == 'vader' else 'recall.png'),
             os.path.join(out_dir, 'quality.png')]
    if metric == 'answer':
        paths = [os.path.join(out_dir, 'answer.png')]
        plot_answer(paths[0], done, title)
        return paths
    if metric == 'vader':
        plot_vader(paths[0], done, title, tuple(vader_parts))
    else:
        plot_recall(paths[0], done, title)
    plot_quality(paths[1], done, title)
    return paths


def default_title(config, name, seeds, finished, fixed=''):
    """The plots' title: the sweep, the model, the counts and the settings every point shares."""
    model = next((r['model']['name'] for r in finished.values()), config['init_from'])
    return (config['plot_title'] or f"{name}: {model}, {len(seeds)} seeds x {config['max_new_tokens']} tokens") + \
        (f"; {fixed}" if fixed else '')


def write_records(out_dir, metric, settings, finished):
    """results.csv and samples.jsonl of the finished settings. Returns results.csv's (columns, rows)."""
    cols, rows = result_table(metric, settings, finished)
    write_whole(os.path.join(out_dir, 'results.csv'), csv_text(cols, rows))
    lines = []
    for s, r in finished_rows(settings, finished):
        rec = finished[s['id']]
        lines.append(json.dumps(dict(setting=s['setting'], setting_index=s['index'], setting_id=s['id'],
                                     label=s['label'], method=s['method'], seed=r['seed'], prompt=rec.get('prompt'),
                                     text=r['text'], tokens=r['tokens'], scores=r['scores'], model=rec['model'],
                                     **rec.get('produced_by', {})), ensure_ascii=False))
    write_whole(os.path.join(out_dir, 'samples.jsonl'), ''.join(l + '\n' for l in lines))
    return cols, rows


def write_outputs(out_dir, config, name, settings, seeds, finished, fixed=''):
    """Rewrite results.csv, samples.jsonl, summary.csv, summary.txt and the plots from the
    finished settings (each file whole). Returns the summary rows and the plot paths."""
    metric = config['metric']
    cols, rows = write_records(out_dir, metric, settings, finished)
    summary = summary_table(metric, settings, finished)
    scols = list(dict.fromkeys(k for r in summary for k in r))
    write_whole(os.path.join(out_dir, 'summary.csv'), csv_text(scols, summary))
    text = summary_text(metric, summary, len(settings))
    write_whole(os.path.join(out_dir, 'summary.txt'), text)
    plots = make_plots(out_dir, metric, settings, finished, default_title(config, name, seeds, finished, fixed),
                       config['vader_parts']) if config['plots'] else []
    return summary, text, plots, (cols, rows)


class WandbLog:
    def __init__(self, config, name):
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=True needs wandb: pip install wandb (WANDB_MODE=offline works without an account)") from None
        self.wandb = wandb
        self.run = wandb.init(project=config['wandb_project'], name=config['wandb_run_name'] or name,
                              config=jsonable({k: v for k, v in config.items() if k != 'memory' or len(v) < 2000}))

    def setting(self, summary_row):
        self.run.log({f"summary/{k}": v for k, v in summary_row.items() if isinstance(v, (int, float))} |
                     {'setting': summary_row['label']})

    def finish(self, summary, table, plots):
        wb = self.wandb
        cols, rows = table
        data = {'results': wb.Table(columns=cols, data=[[json.dumps(r[c]) if isinstance(r[c], (list, dict)) else r[c]
                                                         for c in cols] for r in rows])}
        scols = list(dict.fromkeys(k for r in summary for k in r))
        data['summary'] = wb.Table(columns=scols, data=[[r.get(c) for c in scols] for r in summary])
        for p in plots:
            data[f"plots/{os.path.splitext(os.path.basename(p))[0]}"] = wb.Image(p)
        self.run.log(data)
        self.run.finish()
