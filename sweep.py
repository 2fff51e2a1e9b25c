"""
Sweeps: many settings x many seeds, scored the write-up's ways, with text quality beside.

    python sweep.py config/sweep_table1.py [--key=value ...]
    python sweep.py config/sweep_fig10.py --shard=0/4     # settings 0, 4, 8, ... (one machine of four)
    python sweep.py config/sweep_fig10.py --merge=True    # join out/fig10/shards/* into out/fig10/

A sweep config holds sample.py's keys (the base settings) and the sweep keys of
SWEEP_DEFAULTS below. Every setting runs all its seeds as one batch (row i draws exactly
what a run with seed i alone draws), is scored (VADER sentiment or recall, plus distinct-n
and perplexity under the plain model) and is saved whole in out/<name>/settings/ before the
next one starts; the combined files (results.csv, samples.jsonl, summary.csv/.txt, plots)
are rewritten from the finished settings each time. A rerun skips finished settings.
docs/sweeps.md describes the configs, the outputs and every rule used here.
"""

import glob
import hashlib
import io
import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch.nn import functional as F

from configurator import check_type, configure, run_cli
from model import UserError, encode
from sample import DEFAULTS as SAMPLE_DEFAULTS
from sample import (check_generation, generate, load_model, prepare_memory, prompt_ids, read_text_file,
                    retrieval_settings, seeds_of)

SWEEP_DEFAULTS = dict(
    name='',               # sweep name; '' = the config file's name without "sweep_" and ".py"
    grid={},               # key -> list of values; a tuple of keys -> list of value tuples (varied together)
    seeds=None,            # a count n (seeds seed, seed+1, ..., seed+n-1) or an explicit list; None = 100
    metric='vader',        # 'vader' (sentiment of the continuation) or 'recall' (does it start with an answer?)
    answers=None,          # recall: the answer strings; None = [substitute] when substitute is set
    baselines=[],          # any of 'plain' (no memory) and 'context' (memory text before the prompt)
    out_dir='',            # '' = out/<name>
    substitute='',         # replace every substitute_target in the memory text by this word (Figure 13)
    substitute_target='Vancouver',
    batch_size=0,          # seeds per batch; 0 = all seeds of a setting in one batch
    shard='',              # 'i/n': run settings i, i+n, i+2n, ... (0 <= i < n) into out_dir/shards/i-of-n
    merge=False,           # join out_dir/shards/*/ into out_dir (no generation)
    plots=True,            # write PNG plots
    plot_title='',         # title of the plots; '' = the sweep name, model and counts
    wandb_log=False,       # log summaries, plots and tables to Weights & Biases (WANDB_MODE=offline works)
    wandb_project='gpt2-knn-memory',
    wandb_run_name='',     # '' = the sweep name
)
DEFAULTS = dict(SAMPLE_DEFAULTS, max_new_tokens=100, **SWEEP_DEFAULTS)  # 100 tokens, as in the write-up
DEFAULT_SEED_COUNT = 100

# keys that describe the sweep itself, not a setting: never in the grid
NOT_IN_GRID = {'name', 'grid', 'seeds', 'seed', 'num_samples', 'metric', 'baselines', 'out_dir', 'shard', 'merge',
               'plots', 'plot_title', 'wandb_log', 'wandb_project', 'wandb_run_name', 'batch_size',
               'unadulterated_gpt', 'method_text', 'out_jsonl', 'compile'}
# keys with no effect on the outputs (so not part of a setting's identity)
NOT_IN_ID = NOT_IN_GRID - {'metric'} | {'device', 'store_mem', 'search_note'}
# keys only the memory method uses: blanked for the baselines
RETRIEVAL_KEYS = {'knn_num', 'mem_frac', 'bookkeeping_frac', 'knn_softmax_influence', 'resid_only', 'resid_frac',
                  'search', 'mem_store', 'load_mem_store', 'store_mem', 'remove_bookkeeping_token_mem_size',
                  'decoding'} & set(SAMPLE_DEFAULTS)
MEMORY_TEXT_KEYS = {'memory', 'bookkeeping_token', 'substitute', 'substitute_target'}
# columns of results.csv besides the grid keys
CORE_COLUMNS = [k for k in ('init_from', 'knn_num', 'mem_frac', 'bookkeeping_frac', 'knn_softmax_influence',
                              'resid_only', 'resid_frac', 'remove_bookkeeping_token_mem_size', 'decoding', 'temperature',
                              'top_k', 'max_new_tokens', 'dtype') if k in SAMPLE_DEFAULTS]
VADER_SCORES = ['compound', 'pos', 'neu', 'neg']
QUALITY_SCORES = ['distinct_1', 'distinct_2', 'distinct_3', 'perplexity']
POSITIVE_THRESHOLD = 0.05  # VADER's convention: compound >= 0.05 is positive
# the write-up's colours
COLOURS = dict(compound='tab:green', pos='tab:orange', neg='tab:red', neu='tab:blue')
SHORT = dict(mem_frac='MF', bookkeeping_frac='BF', knn_softmax_influence='TS', resid_frac='r', top_k='top_k',
             temperature='T')
SETTING_FORMAT = 'sweep-setting'
SETTING_FORMAT_VERSION = 1


# -----------------------------------------------------------------------------
# scores

_vader = None


def vader_scores(text):
    """VADER's compound, pos, neu, neg of a text (the continuation alone, prompt excluded)."""
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _vader = SentimentIntensityAnalyzer()
    s = _vader.polarity_scores(text)
    return {k: s[k] for k in VADER_SCORES}


def recall_answer(text, answers):
    """The answer the continuation starts with, or None.

    Leading whitespace of the continuation is skipped; the comparison ignores case; the
    answer must end at a word boundary (the next character, if any, is not a letter, a
    digit or '_'): "Vancouver." and "Vancouver's" count, "Vancouverite" does not.
    Answers are stripped of surrounding whitespace; the longest matching answer is given.
    """
    t = text.lstrip().casefold()
    for a in sorted((a.strip() for a in answers), key=len, reverse=True):
        a_cf = a.casefold()
        if a_cf and t.startswith(a_cf):
            nxt = t[len(a_cf):len(a_cf) + 1]
            if not nxt or not (nxt.isalnum() or nxt == '_'):
                return a
    return None


def distinct_n(tokens, n):
    """Unique n-grams / all n-grams of one continuation's token ids; NaN if it has none."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float('nan')


@torch.no_grad()
def perplexities(model, prompt, continuations, max_logit_floats=1 << 26):
    """exp(mean NLL) of each continuation's tokens under the plain model (no memory),
    given the prompt and the continuation's preceding tokens. Batched; rows whose logits
    would exceed max_logit_floats go in several chunks. Sequences longer than block_size
    keep their last block_size tokens (the prompt is cut first)."""
    model.attach_memory(None)
    device = next(model.parameters()).device
    block, V = model.config.block_size, model.config.vocab_size
    out = [float('nan')] * len(continuations)
    by_len = {}
    for i, c in enumerate(continuations):
        by_len.setdefault(len(c), []).append(i)
    for n, rows in by_len.items():
        if n == 0:
            continue
        seqs = [(prompt + continuations[i])[-block:] for i in rows]
        L = len(seqs[0])
        first = max(L - n, 1)  # first scored position (it needs one token before it)
        per_chunk = max(1, max_logit_floats // (L * V))
        for c0 in range(0, len(rows), per_chunk):
            x = torch.tensor(seqs[c0:c0 + per_chunk], dtype=torch.long, device=device)
            logits, _, _ = model(x, use_memory=False, all_logits=True)
            logp = F.log_softmax(logits[:, first - 1:L - 1].float(), dim=-1)
            nll = -logp.gather(-1, x[:, first:, None]).squeeze(-1).mean(dim=1)
            for r, v in zip(rows[c0:c0 + per_chunk], torch.exp(nll).tolist()):
                out[r] = v
    return out


def score_rows(metric, answers, texts, tokens, ppl):
    rows = []
    for text, toks, p in zip(texts, tokens, ppl):
        s = {}
        if metric == 'vader':
            s.update(vader_scores(text))
            s['positive'] = int(s['compound'] >= POSITIVE_THRESHOLD)
        else:
            a = recall_answer(text, answers)
            s['success'] = int(a is not None)
            s['answer'] = a or ''
        for n in (1, 2, 3):
            s[f'distinct_{n}'] = distinct_n(toks, n)
        s['perplexity'] = p
        rows.append(s)
    return rows


def summarize(metric, rows):
    """Per-setting summary: median, IQR (75th - 25th percentile, numpy's linear
    interpolation) and mean of each score; fraction positive (VADER) or successes (recall)."""
    out = dict(seeds=len(rows))
    cols = (VADER_SCORES if metric == 'vader' else []) + QUALITY_SCORES
    for c in cols:
        vals = np.array([r['scores'][c] for r in rows], dtype=float)
        vals = vals[~np.isnan(vals)]
        if len(vals):
            q25, med, q75 = np.percentile(vals, [25, 50, 75])
            out.update({f'{c}_median': float(med), f'{c}_iqr': float(q75 - q25), f'{c}_mean': float(vals.mean())})
        else:
            out.update({f'{c}_median': float('nan'), f'{c}_iqr': float('nan'), f'{c}_mean': float('nan')})
    if metric == 'vader':
        out['frac_positive'] = sum(r['scores']['positive'] for r in rows) / len(rows) if rows else float('nan')
    else:
        out['successes'] = sum(r['scores']['success'] for r in rows)
    return out


# -----------------------------------------------------------------------------
# configs and settings

def jsonable(v):
    if isinstance(v, dict):
        return {str(k) if not isinstance(k, tuple) else '+'.join(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def sweep_seeds(config):
    """sample.py's rule: a count n gives seed, seed+1, ..., seed+n-1 (seed = 1337 by default);
    a list is used as is. None means DEFAULT_SEED_COUNT."""
    return seeds_of(dict(config, seeds=DEFAULT_SEED_COUNT if config['seeds'] is None else config['seeds']))


def memory_text(config):
    """The memory text as the memory stores it: a FILE: text gets the bookkeeping token put in
    front (as sample.py does); then every substitute_target becomes substitute."""
    text = config['memory']
    if text.startswith('FILE:'):
        text = config['bookkeeping_token'] + read_text_file(text[5:], 'memory')
    if config['substitute']:
        target = config['substitute_target']
        if not target or target not in text:
            raise UserError(f"substitute={config['substitute']!r} replaces {target!r}, which the memory text "
                            f"does not contain; set substitute_target to a word of the memory")
        text = text.replace(target, config['substitute'])
    return text


def prompt_text(config):
    start = config['start']
    return read_text_file(start[5:], 'prompt') if start.startswith('FILE:') else start


def answers_of(config):
    if config['answers'] is not None:
        answers = config['answers']
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, (list, tuple)) or not answers or \
                not all(isinstance(a, str) and a.strip() for a in answers):
            raise UserError(f"answers={answers!r} must be a non-empty list of non-empty strings")
        return list(answers)
    if config['substitute']:
        return [config['substitute']]
    raise UserError("metric='recall' needs answers=[...] (or substitute=WORD, whose answer is that word)")


def grid_axes(config):
    """The grid as a list of (keys, list of value tuples)."""
    grid = config['grid']
    if not isinstance(grid, dict):
        raise UserError(f"grid={grid!r} must be a dict: key -> list of values")
    axes, seen = [], set()
    for key, values in grid.items():
        keys = tuple(key) if isinstance(key, tuple) else (key,)
        for k in keys:
            if not isinstance(k, str) or k not in DEFAULTS:
                import difflib
                match = difflib.get_close_matches(str(k), list(DEFAULTS), n=1, cutoff=0.6)
                raise UserError(f"grid key {k!r} is not a config key" + (f"; did you mean {match[0]}?" if match else ""))
            if k in NOT_IN_GRID:
                raise UserError(f"grid key {k!r} describes the sweep, not a setting; set it outside the grid")
            if k in seen:
                raise UserError(f"grid key {k!r} appears twice in the grid")
            seen.add(k)
        if not isinstance(values, (list, tuple)) or not values:
            raise UserError(f"grid[{key!r}] must be a non-empty list of values")
        vals = []
        for v in values:
            if len(keys) > 1:
                if not isinstance(v, (list, tuple)) or len(v) != len(keys):
                    raise UserError(f"grid[{key!r}]: {v!r} must be a tuple of {len(keys)} values, one per key")
            else:
                v = (v,)
            vals.append(tuple(check_type(k, x, DEFAULTS[k], f"grid[{key!r}]") for k, x in zip(keys, v)))
        axes.append((keys, vals))
    return axes


def fmt_value(key, v):
    if key == 'knn_num' and isinstance(v, (list, tuple)):
        layers = [i for i, k in enumerate(v) if k]
        if not layers:
            return 'no memory layers'
        ks = {v[i] for i in layers}
        where = 'layer' + ('s ' if len(layers) > 1 else ' ') + ','.join(map(str, layers))
        return f"{where} k{ks.pop()}" if len(ks) == 1 else where + ' k ' + ','.join(str(v[i]) for i in layers)
    if isinstance(v, float) and v == int(v):
        v = int(v)
    if key in SHORT:
        return f"{SHORT[key]} {v}"
    if key in ('substitute', 'answers', 'start', 'memory'):
        s = str(v).replace('\n', '\\n')
        return s if len(s) <= 24 else s[:21] + '...'
    return f"{key}={v}"


def setting_label(method, values, method_text=None):
    parts = []
    vals = dict(values)
    if method == 'memory' and 'resid_only' in vals and 'resid_frac' in vals:
        ro, r = vals.pop('resid_only'), vals.pop('resid_frac')
        t = 1 if not ro and not r else 2 if ro else 3
        parts.append(f"Type {t}" + (f" (r {fmt_value('', r).split('=')[-1]})" if r else ''))
    parts += [fmt_value(k, v) for k, v in vals.items()]
    head = {'plain': 'plain', 'context': 'context'}.get(method)
    if head:
        parts.insert(0, head)
    if not parts and method_text and method_text != SAMPLE_DEFAULTS.get('method_text'):
        return method_text
    return ', '.join(parts) if parts else 'memory'


def make_setting(config, method, values, seeds):
    c = dict(config)
    c.update(values)
    check_generation(c, f"setting {method} {jsonable(values)}" if values else method)
    if method != 'memory':
        for k in RETRIEVAL_KEYS:
            c[k] = None if k == 'knn_num' else SAMPLE_DEFAULTS[k]  # the baselines use no memory
    mem_text = memory_text(c) if method != 'plain' else ''
    if method == 'context' and not mem_text.strip():
        raise UserError("the 'context' baseline needs a memory text: set memory=... or memory=FILE:path")
    ident = {k: v for k, v in c.items()
             if k not in NOT_IN_ID and k not in MEMORY_TEXT_KEYS or (k == 'bookkeeping_token' and method == 'memory')}
    if c['metric'] != 'recall':
        ident.pop('answers', None)
    else:
        ident['answers'] = answers_of(c)
    ident.update(method=method, seeds=seeds, start=prompt_text(c), memory_text=mem_text)
    if method == 'plain' or (method == 'memory' and c['load_mem_store']):
        ident.pop('memory_text')
    sid = hashlib.sha256(json.dumps(jsonable(ident), sort_keys=True).encode()).hexdigest()[:12]
    return dict(id=sid, method=method, values=values, label=setting_label(method, values, c['method_text']),
                setting=dict(method=method, **jsonable(values)), config=c)


def expand(config):
    """Every setting of the sweep, in order: the baselines first, then the grid (first key slowest)."""
    seeds = sweep_seeds(config)
    axes = grid_axes(config)
    baselines = config['baselines']
    if isinstance(baselines, str):
        baselines = [baselines]
    if not isinstance(baselines, (list, tuple)) or any(b not in ('plain', 'context') for b in baselines):
        raise UserError(f"baselines={baselines!r} must be a list of 'plain' and/or 'context'")
    keep_substitute = config['metric'] == 'recall' and config['answers'] is None
    settings = []
    for b in dict.fromkeys(baselines):
        ignore = set(RETRIEVAL_KEYS)
        if b == 'plain':
            ignore |= MEMORY_TEXT_KEYS - ({'substitute'} if keep_substitute else set())
        b_axes = [(keys, vals) for keys, vals in axes if not set(keys) <= ignore]
        for combo in itertools.product(*[list(dict.fromkeys(vals)) for _, vals in b_axes]):
            values = {k: v for (keys, _), vs in zip(b_axes, combo) for k, v in zip(keys, vs)}
            settings.append(make_setting(config, b, values, seeds))
    for combo in itertools.product(*[vals for _, vals in axes]):
        values = {k: v for (keys, _), vs in zip(axes, combo) for k, v in zip(keys, vs)}
        settings.append(make_setting(config, 'memory', values, seeds))
    unique, seen = [], set()
    for s in settings:
        if s['id'] not in seen:
            seen.add(s['id'])
            unique.append(s)
    for i, s in enumerate(unique):
        s['index'] = i
    return unique, seeds


def parse_shard(shard):
    if not shard:
        return None
    try:
        i, n = (int(x) for x in str(shard).split('/'))
    except ValueError:
        raise UserError(f"shard={shard!r} must be 'i/n' with 0 <= i < n, e.g. --shard=0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"shard={shard!r} must be 'i/n' with 0 <= i < n, e.g. --shard=0/4")
    return i, n


# -----------------------------------------------------------------------------
# files

def write_whole(path, data):
    """Write bytes or text to path through a temporary file and os.replace: never half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=d)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode('utf-8') if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_finished(dirs, ids):
    """{setting id: record} of the settings files in dirs that belong to this sweep."""
    found = {}
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, 'settings', '*.json'))):
            try:
                with open(f, encoding='utf-8') as fh:
                    rec = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                warnings.warn(f"{f} is unreadable; its setting will be run again")
                continue
            if rec.get('format') == SETTING_FORMAT and rec.get('id') in ids and rec['id'] not in found:
                found[rec['id']] = rec
    return found


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
    grid_cols = list(dict.fromkeys(k for s in settings for k in s['values']))
    cols = ['setting_index', 'setting_id', 'label', 'method', 'seed'] + grid_cols + \
           [c for c in CORE_COLUMNS if c not in grid_cols]
    score_cols = (VADER_SCORES + ['positive'] if metric == 'vader' else ['success', 'answer']) + QUALITY_SCORES
    rows = []
    for s, r in finished_rows(settings, finished):
        row = dict(setting_index=s['index'], setting_id=s['id'], label=s['label'], method=s['method'], seed=r['seed'])
        for c in grid_cols + CORE_COLUMNS:
            if c not in row:
                row[c] = None if s['method'] != 'memory' and c in RETRIEVAL_KEYS else finished[s['id']]['config'].get(c)
        row.update({c: r['scores'][c] for c in score_cols})
        rows.append(row)
    return cols + score_cols, rows


def summary_table(metric, settings, finished):
    rows = []
    for s in settings:
        rec = finished.get(s['id'])
        if rec is not None:
            rows.append(dict(setting_index=s['index'], setting_id=s['id'], label=s['label'], method=s['method'],
                             **summarize(metric, rec['rows'])))
    return rows


def summary_text(metric, summary, n_settings):
    if metric == 'vader':
        head = f"{'setting':<34} {'seeds':>5} {'compound med (IQR)':>19} {'mean':>6} {'pos':>5} {'neu':>5} " \
               f"{'neg':>5} {'%pos':>5} {'dist-1/2/3':>14} {'ppl med':>8}"
    else:
        head = f"{'setting':<40} {'successes':>12} {'dist-1/2/3':>14} {'ppl med':>8}"
    lines = [head, '-' * len(head)]
    for r in summary:
        label = r['label'] if len(r['label']) <= 34 else r['label'][:31] + '...'
        dist = '/'.join(f"{r[f'distinct_{n}_mean']:.2f}" for n in (1, 2, 3))
        if metric == 'vader':
            lines.append(f"{label:<34} {r['seeds']:>5} {r['compound_median']:>8.3f} ({r['compound_iqr']:.3f})  "
                         f"{r['compound_mean']:>6.3f} {r['pos_median']:>5.2f} {r['neu_median']:>5.2f} "
                         f"{r['neg_median']:>5.2f} {100 * r['frac_positive']:>5.0f} {dist:>14} {r['perplexity_median']:>8.1f}")
        else:
            label = r['label'] if len(r['label']) <= 40 else r['label'][:37] + '...'
            lines.append(f"{label:<40} {r['successes']:>5} / {r['seeds']:<4} {dist:>14} {r['perplexity_median']:>8.1f}")
    if len(summary) < n_settings:
        lines.append(f"({n_settings - len(summary)} of {n_settings} settings not finished yet)")
    if metric == 'vader':
        lines.append("medians of VADER scores of the continuation; %pos = compound >= 0.05; dist = mean distinct-n "
                     "of tokens; ppl = perplexity under the plain model")
    else:
        lines.append("successes = seeds whose continuation starts with an answer; dist = mean distinct-n of tokens; "
                     "ppl = perplexity under the plain model")
    return '\n'.join(lines) + '\n'


def save_png(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
    write_whole(path, buf.getvalue())


def make_plots(out_dir, metric, settings, finished, title):
    """vader.png (box plots of the four VADER scores per setting) or recall.png (bars), and
    quality.png (perplexity box plots and mean distinct-n per setting)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    done = [(s, finished[s['id']]) for s in settings if s['id'] in finished]
    if not done:
        return []
    labels = [s['label'] for s, _ in done]
    x = np.arange(len(done))
    width = max(6.0, 0.9 * len(done) + 2)
    paths = []
    rot = dict(rotation=30 if len(done) > 3 else 0, ha='right' if len(done) > 3 else 'center')
    if metric == 'vader':
        fig, ax = plt.subplots(figsize=(width, 4.8))
        order = ['compound', 'pos', 'neg', 'neu']
        w = 0.8 / len(order)
        for j, c in enumerate(order):
            data = [[r['scores'][c] for r in rec['rows']] for _, rec in done]
            bp = ax.boxplot(data, positions=x - 0.4 + w * (j + 0.5), widths=w * 0.85, patch_artist=True,
                            manage_ticks=False, flierprops=dict(markersize=2))
            for box in bp['boxes']:
                box.set_facecolor(COLOURS[c])
                box.set_alpha(0.75)
            for med in bp['medians']:
                med.set_color('black')
            rng = np.random.default_rng(0)  # every seed as a dot, jittered sideways (fixed jitter)
            for xi, d in zip(x - 0.4 + w * (j + 0.5), data):
                ax.scatter(xi + rng.uniform(-w * 0.3, w * 0.3, len(d)), d, s=4, color=COLOURS[c], alpha=0.5,
                           linewidths=0, zorder=3)
        ax.set_xticks(x, labels, **rot)
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color='grey', lw=0.5)
        ax.set_ylabel('VADER score of the continuation')
        from matplotlib.patches import Patch
        ax.legend([Patch(color=COLOURS[c], alpha=0.75) for c in order], ['compound', 'positive', 'negative', 'neutral'],
                  loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.set_title(title, fontsize=10)
        save_png(fig, os.path.join(out_dir, 'vader.png'))
        paths.append(os.path.join(out_dir, 'vader.png'))
    else:
        fig, ax = plt.subplots(figsize=(width, 4.5))
        succ = [sum(r['scores']['success'] for r in rec['rows']) for _, rec in done]
        n = [len(rec['rows']) for _, rec in done]
        colours = ['tab:gray' if s['method'] == 'plain' else 'tab:olive' if s['method'] == 'context' else 'tab:blue'
                   for s, _ in done]
        bars = ax.bar(x, succ, color=colours)
        for b, k, m in zip(bars, succ, n):
            ax.annotate(f"{k}/{m}", (b.get_x() + b.get_width() / 2, b.get_height()), ha='center', va='bottom', fontsize=8)
        ax.set_xticks(x, labels, **rot)
        ax.set_ylim(0, max(n) * 1.1)
        ax.set_ylabel('seeds that give the answer')
        ax.set_title(title, fontsize=10)
        save_png(fig, os.path.join(out_dir, 'recall.png'))
        paths.append(os.path.join(out_dir, 'recall.png'))
    plt.close('all')
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(2 * width, 4.2))
    ppl = [[r['scores']['perplexity'] for r in rec['rows'] if not math.isnan(r['scores']['perplexity'])]
           for _, rec in done]
    a1.boxplot(ppl, positions=x, widths=0.6, flierprops=dict(markersize=2))
    flat = [v for p in ppl for v in p]
    if flat and min(flat) > 0 and max(flat) / min(flat) > 20:
        a1.set_yscale('log')
    a1.set_xticks(x, labels, **rot)
    a1.set_ylabel('perplexity under the plain model')
    w = 0.8 / 3
    for j, (nn, col) in enumerate(zip((1, 2, 3), ('tab:cyan', 'tab:purple', 'tab:brown'))):
        means = [np.nanmean([r['scores'][f'distinct_{nn}'] for r in rec['rows']]) for _, rec in done]
        a2.bar(x - 0.4 + w * (j + 0.5), means, width=w * 0.9, color=col, label=f'distinct-{nn}')
    a2.set_xticks(x, labels, **rot)
    a2.set_ylim(0, 1.05)
    a2.set_ylabel('mean distinct-n (tokens)')
    a2.legend(fontsize=8, loc='lower right')
    fig.suptitle(title + ' - text quality', fontsize=10)
    save_png(fig, os.path.join(out_dir, 'quality.png'))
    paths.append(os.path.join(out_dir, 'quality.png'))
    plt.close('all')
    return paths


def default_title(config, name, seeds, finished):
    model = next((r['model']['name'] for r in finished.values()), config['init_from'])
    return config['plot_title'] or f"{name}: {model}, {len(seeds)} seeds x {config['max_new_tokens']} tokens"


def write_outputs(out_dir, config, name, settings, seeds, finished):
    """Rewrite results.csv, samples.jsonl, summary.csv, summary.txt and the plots from the
    finished settings (each file whole). Returns the summary rows and the plot paths."""
    metric = config['metric']
    cols, rows = result_table(metric, settings, finished)
    write_whole(os.path.join(out_dir, 'results.csv'), csv_text(cols, rows))
    lines = []
    for s, r in finished_rows(settings, finished):
        lines.append(json.dumps(dict(setting=s['setting'], setting_index=s['index'], setting_id=s['id'],
                                     label=s['label'], seed=r['seed'], text=r['text'], tokens=r['tokens'],
                                     scores=r['scores']), ensure_ascii=False))
    write_whole(os.path.join(out_dir, 'samples.jsonl'), ''.join(l + '\n' for l in lines))
    summary = summary_table(metric, settings, finished)
    scols = list(dict.fromkeys(k for r in summary for k in r))
    write_whole(os.path.join(out_dir, 'summary.csv'), csv_text(scols, summary))
    text = summary_text(metric, summary, len(settings))
    write_whole(os.path.join(out_dir, 'summary.txt'), text)
    plots = make_plots(out_dir, metric, settings, finished, default_title(config, name, seeds, finished)) \
        if config['plots'] else []
    return summary, text, plots, (cols, rows)


# -----------------------------------------------------------------------------
# running

class Runner:
    """Holds the model (reloaded only when init_from/dtype/device change), the memories
    (one build per memory text, for the union of the layers its settings use) and the
    continuations already generated in this run (identical generations are not redone)."""

    def __init__(self, settings):
        self.model_key, self.model, self.enc = None, None, None
        self.memories, self.generations = {}, {}
        self.layers = {}
        for s in settings:
            if s['method'] == 'memory' and isinstance(s['config']['knn_num'], (list, tuple)):
                key = self.memory_key(s['config'])
                self.layers.setdefault(key, set()).update(i for i, k in enumerate(s['config']['knn_num']) if k)

    @staticmethod
    def memory_key(c):
        keys = ('init_from', 'dtype', 'device', 'bookkeeping_token', 'remove_bookkeeping_token_mem_size',
                'mem_store', 'load_mem_store')
        return json.dumps([[c[k] for k in keys], None if c['load_mem_store'] else memory_text(c)])

    def model_for(self, c):
        key = (c['init_from'], c['dtype'], c['device'])
        if key != self.model_key:
            self.model, self.enc = None, None
            self.memories.clear()
            self.model, self.enc = load_model(c)
            self.model.eval()
            self.model_key = key
        return self.model, self.enc

    def memory_for(self, c, model, enc):
        """The memory of setting c, in use with c's retrieval settings (None when every k is 0)."""
        settings = retrieval_settings(c, model.config.n_layer)
        from memory import check_retrieval_settings
        check_retrieval_settings(n_layer=model.config.n_layer, **settings)
        if not any(settings['knn_num']):
            return None
        key = self.memory_key(c)
        if key not in self.memories:
            layers = self.layers.get(key, set()) | {i for i, k in enumerate(settings['knn_num']) if k}
            union = [1 if i in layers else 0 for i in range(model.config.n_layer)]
            text = c['memory'] if c['load_mem_store'] else memory_text(c)
            self.memories[key] = prepare_memory(dict(c, memory=text, knn_num=union), model, enc, progress=False)
        return self.memories[key].use(**settings, device=next(model.parameters()).device, search=c['search'])

    def run(self, s, bar=None):
        c = s['config']
        model, enc = self.model_for(c)
        start, ids = prompt_ids(c, enc)
        seeds = s['seeds']
        memory, gen_ids = None, ids
        if s['method'] == 'context':
            gen_ids = encode(enc, memory_text(c) + start)
        elif s['method'] == 'memory':
            memory = self.memory_for(c, model, enc)
        if len(gen_ids) + c['max_new_tokens'] > model.config.block_size:
            warnings.warn(f"setting '{s['label']}': {len(gen_ids)} prompt tokens + {c['max_new_tokens']} new tokens "
                          f"exceed block_size {model.config.block_size}; the context is cropped to its last "
                          f"{model.config.block_size} tokens")
        gen_key = json.dumps(jsonable(dict(model=self.model_key, ids=gen_ids, seeds=seeds, method=s['method'],
                                           settings=retrieval_settings(c, model.config.n_layer) if memory else None,
                                           memory=self.memory_key(c) if memory else None, search=c['search'],
                                           temperature=c['temperature'], top_k=c['top_k'], n=c['max_new_tokens'])))
        t0 = time.time()
        if gen_key in self.generations:
            conts = self.generations[gen_key]
            if bar is not None:
                bar.update(c['max_new_tokens'] * self.batches(len(seeds), c))
        else:
            conts = []
            bs = c['batch_size'] or len(seeds)
            with torch.no_grad():
                for i in range(0, len(seeds), bs):
                    conts += generate(model, gen_ids, seeds[i:i + bs], c, memory, progress=bar)
            self.generations[gen_key] = conts
        t_gen = time.time() - t0
        texts = [enc.decode(t) for t in conts]
        ppl = perplexities(model, ids, conts)
        answers = answers_of(c) if c['metric'] == 'recall' else None
        scores = score_rows(c['metric'], answers, texts, conts, ppl)
        return dict(format=SETTING_FORMAT, format_version=SETTING_FORMAT_VERSION, id=s['id'], index=s['index'],
                    method=s['method'], setting=s['setting'], label=s['label'], metric=c['metric'], answers=answers,
                    prompt=start, prompt_tokens=len(gen_ids), config=jsonable({k: v for k, v in c.items() if k != 'grid'}),
                    model=dict(name=model.name, fingerprint=model.fingerprint()), device=c['device'],
                    generation_s=round(t_gen, 3), seeds=seeds,
                    rows=[dict(seed=sd, text=t, tokens=tk, scores=sc)
                          for sd, t, tk, sc in zip(seeds, texts, conts, scores)])

    @staticmethod
    def batches(n, c):
        bs = c['batch_size'] or n
        return (n + bs - 1) // bs


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


def sweep_name(config, argv):
    if config['name']:
        return config['name']
    files = [a for a in argv if not a.startswith('--')]
    if not files:
        return 'sweep'
    stem = os.path.splitext(os.path.basename(files[-1]))[0]
    return stem[len('sweep_'):] if stem.startswith('sweep_') and len(stem) > 6 else stem


def main(argv):
    config = configure(DEFAULTS, argv)
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    if config['metric'] not in ('vader', 'recall'):
        raise UserError(f"metric={config['metric']!r} must be 'vader' or 'recall'")
    if config['batch_size'] < 0:
        raise UserError(f"batch_size={config['batch_size']} must be >= 0 (0 = all seeds in one batch)")
    name = sweep_name(config, argv)
    out_dir = config['out_dir'] or os.path.join('out', name)
    settings, seeds = expand(config)
    for s in settings:
        s['seeds'] = seeds
    ids = {s['id'] for s in settings}
    shard = parse_shard(config['shard'])
    if config['merge']:
        if shard:
            raise UserError("merge=True joins the shards; give it without --shard")
        return merge(config, name, out_dir, settings, seeds)
    run_dir = os.path.join(out_dir, 'shards', f"{shard[0]}-of-{shard[1]}") if shard else out_dir
    mine = [s for s in settings if shard is None or s['index'] % shard[1] == shard[0]]
    write_whole(os.path.join(run_dir, 'sweep.json'),
                json.dumps(dict(name=name, shard=config['shard'] or None, seeds=seeds,
                                config=jsonable({k: v for k, v in config.items()}),
                                settings=[dict(index=s['index'], id=s['id'], label=s['label'], setting=s['setting'])
                                          for s in settings]), indent=1, ensure_ascii=False))
    finished = load_finished([run_dir], ids)
    todo = [s for s in mine if s['id'] not in finished]
    print(f"sweep {name}: {len(settings)} settings x {len(seeds)} seeds"
          + (f", shard {shard[0]}/{shard[1]}: {len(mine)} settings" if shard else '')
          + f"; {len(mine) - len(todo)} already finished, {len(todo)} to run; output in {run_dir}", file=sys.stderr)
    wb = WandbLog(config, config['wandb_run_name'] or name + (f"-shard{shard[0]}of{shard[1]}" if shard else '')) \
        if config['wandb_log'] else None
    runner = Runner(todo)
    from tqdm import tqdm
    fingerprint = None
    with tqdm(total=len(todo), desc='settings', unit='setting', file=sys.stderr, position=0) as sbar:
        for s in todo:
            c = s['config']
            with tqdm(total=c['max_new_tokens'] * Runner.batches(len(seeds), c), desc=s['label'][:30], unit='tok',
                      file=sys.stderr, position=1, leave=False) as tbar:
                rec = runner.run(s, tbar)
            fp = rec['model']['fingerprint']
            if fingerprint is None:
                fingerprint = fp
                others = {r['model']['fingerprint'] for r in finished.values()
                          if r['model']['name'] == rec['model']['name']} - {fp}
                if others:
                    raise UserError(f"{run_dir} holds results of model {rec['model']['name']} with other weights "
                                    f"({', '.join(sorted(others))}, now {fp}); use another out_dir or remove it")
            write_whole(os.path.join(run_dir, 'settings', f"{s['id']}.json"), json.dumps(rec, ensure_ascii=False))
            finished[s['id']] = rec
            summary, _, _, _ = write_outputs(run_dir, config, name, mine, seeds, finished)
            if wb:
                wb.setting(next(r for r in summary if r['setting_id'] == s['id']))
            sbar.update(1)
    summary, text, plots, table = write_outputs(run_dir, config, name, mine, seeds, finished)
    print(text, end='')
    print(f"wrote {', '.join(os.path.join(run_dir, f) for f in ['results.csv', 'samples.jsonl', 'summary.csv', 'summary.txt'])}"
          + (', ' + ', '.join(plots) if plots else ''))
    if shard:
        print(f"when every shard is done, join them: python sweep.py {' '.join(a for a in argv if not a.startswith('--shard'))} --merge=True")
    if wb:
        wb.finish(summary, table, plots)


def merge(config, name, out_dir, settings, seeds):
    """Join out_dir/shards/*/settings into out_dir: the same files a single run writes."""
    shard_dirs = sorted(d for d in glob.glob(os.path.join(out_dir, 'shards', '*')) if os.path.isdir(d))
    if not shard_dirs and not os.path.isdir(os.path.join(out_dir, 'settings')):
        raise UserError(f"nothing to merge: {out_dir}/shards/ holds no shard folders (run with --shard=i/n first, "
                        f"or copy the machines' {out_dir}/shards/* here)")
    ids = {s['id'] for s in settings}
    finished = load_finished([out_dir] + shard_dirs, ids)
    fps = {(r['model']['name'], r['model']['fingerprint']) for r in finished.values()}
    if len({n for n, _ in fps}) < len(fps):
        raise UserError(f"the shards were run with different weights of the same model ({sorted(fps)}); rerun them alike")
    for sid, rec in finished.items():
        path = os.path.join(out_dir, 'settings', f"{sid}.json")
        if not os.path.isfile(path):
            write_whole(path, json.dumps(rec, ensure_ascii=False))
    summary, text, plots, table = write_outputs(out_dir, config, name, settings, seeds, finished)
    missing = [s for s in settings if s['id'] not in finished]
    print(text, end='')
    print(f"merged {len(finished)} of {len(settings)} settings from {len(shard_dirs)} shard folder(s) into {out_dir}")
    if missing:
        print(f"missing {len(missing)} setting(s): " + '; '.join(f"{s['index']} ({s['label']})" for s in missing[:10])
              + (' ...' if len(missing) > 10 else '') + " - run their shards, then merge again", file=sys.stderr)
    if config['wandb_log']:
        WandbLog(config, config['wandb_run_name'] or name).finish(summary, table, plots)


if __name__ == '__main__':
    run_cli(main)
