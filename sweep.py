"""
Sweeps: many settings x many seeds, scored the write-up's ways, with text quality beside.

    python sweep.py config/sweep_table1.py [--key=value ...]
    python sweep.py config/sweep_fig10.py --shard=0/4     # settings 0, 4, 8, ... (one machine of four)
    python sweep.py config/sweep_fig10.py --merge=True    # join out/fig10/shards/* into out/fig10/

A sweep config holds a run's keys (run.RUN_DEFAULTS, as in sample.py: the base settings) and the sweep keys of
SWEEP_DEFAULTS below. Every setting runs all its seeds as one batch (row i draws exactly
what a run with seed i alone draws), is scored (scores.py: VADER sentiment or recall, plus
distinct-n and perplexity under the plain model) and is saved whole in out/<name>/settings/
before the next one starts; the combined files (report.py: results.csv, samples.jsonl,
summary.csv/.txt, plots) are rewritten from the finished settings each time. A rerun skips
finished settings. docs/sweeps.md describes the configs, the outputs and every rule used here.
"""

import difflib
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, fields

import run_config
from configurator import REPOSITORY, UserError, answer_help, check_type, configure, run_cli
from launch import LAUNCH_DEFAULTS
from run_config import RUN_DEFAULTS

SWEEP_DEFAULTS = dict(
    name='',               # sweep name; '' = the config file's name without "sweep_" and ".py"
    grid={},               # key -> list of values; a tuple of keys -> list of value tuples (varied together)
    seeds=None,            # a count n (seeds seed, seed+1, ..., seed+n-1) or an explicit list; None = 100
    metric='vader',        # 'vader' (sentiment of the continuation), 'recall' (does it start with an answer?) or
                           # 'answer' (only the answers' probability, teacher-forced: no sampling, no seeds)
    item_set='',           # a set file (sets.py, docs/evaluation.md): run every setting on each of its items
    split='both',          # item_set: the items of 'dev', 'test' or 'both' splits
    max_items=0,           # item_set: only the first n items of each split (a quick look); 0 = all
    set_memory='item',     # recall sets: each item's memory (and context) is its own document ('item') or all the set's ('all')
    answers=None,          # recall: the answer strings; None = [substitute] when substitute is set
    baselines=[],          # any of 'plain' (no memory), 'context' (memory text before the prompt), 'actadd'
    actadd_prompts=['Love', 'Hate'],  # ActAdd (docs/method.md section 9): the prompt pair (p+, p-)
    actadd_layer=6,        # ActAdd: the block (0-based) whose incoming residual stream is steered
    actadd_coeff=5.0,      # ActAdd: c, the coefficient of h+ - h-
    out_dir='',            # '' = out/<name>
    substitute='',         # replace every substitute_target in the memory text by this word (Figure 13)
    substitute_target='Vancouver',  # the word that substitute replaces
    batch_size=0,          # seeds per batch; 0 = all seeds of a setting in one batch
    shard='',              # 'i/n': run settings i, i+n, i+2n, ... (0 <= i < n) into out_dir/shards/i-of-n
    merge=False,           # join out_dir/shards/*/ into out_dir (no generation)
    extend=False,          # allow adding settings to an out_dir that holds this sweep with fewer (same seeds)
    replace=False,         # an out_dir holding another sweep: remove the files a sweep writes there, then run
    plots=True,            # write PNG plots
    vader_parts=['compound'],  # the VADER scores vader.png draws: any of 'compound', 'pos', 'neg', 'neu'
    replot=False,          # redraw out_dir's plots from its samples.jsonl (no generation): after a change to the plots
    plot_title='',         # title of the plots; '' = the sweep name, model and counts (the fixed settings follow)
    wandb_log=False,       # log summaries, plots and tables to Weights & Biases (WANDB_MODE=offline works)
    wandb_project='gpt2-knn-memory',  # the Weights & Biases project
    wandb_run_name='',     # '' = the sweep name
    **LAUNCH_DEFAULTS,     # run the shards as jobs (SLURM, or local subprocesses) and merge them (launch.py)
)
DEFAULTS = dict(RUN_DEFAULTS, max_new_tokens=100, **SWEEP_DEFAULTS)  # 100 tokens, as in the write-up
if __name__ == '__main__':  # --help answers here, before torch and FAISS are imported (seconds)
    answer_help(DEFAULTS, __doc__, [__file__, run_config, os.path.join(REPOSITORY, 'launch.py')])

import torch
from tqdm import tqdm

import report
import set_report
from actadd import ActAdd
from files import write_whole
from knn_index import SearchSettings
from launch import check_launch, launch_shards, shard_argv
from memory import RetrievalSettings
from report import jsonable
from run import (
    MemorySource,
    Sampling,
    answer_scores,
    check_device,
    continuations,
    load_model,
    memory_text,
    prompt_ids,
    prompt_text,
    readout_of,
    seeds_of,
)
from scores import VADER_SCORES, perplexities, score_rows
from sets import load_set
from store import check_outside_memories
from tokenizer import encode

DEFAULT_SEED_COUNT = 100

# keys that describe the sweep itself, not a setting: never in the grid
NOT_IN_GRID = {'name', 'grid', 'seeds', 'seed', 'num_samples', 'metric', 'baselines', 'out_dir', 'shard', 'merge', 'extend', 'replace',
               'plots', 'vader_parts', 'replot', 'plot_title', 'wandb_log', 'wandb_project', 'wandb_run_name', 'batch_size',
               'method_text', 'compile', 'item_set', 'split', 'max_items'} | set(LAUNCH_DEFAULTS)
# keys only the memory method reads (RetrievalSettings, its search and decoding, a saved memory):
# the baselines do not vary with them
RETRIEVAL_KEYS = {f.name for f in fields(RetrievalSettings)} | {
    'search', 'decoding', 'mem_store', 'load_mem_store', 'store_mem', 'remove_bookkeeping_token_mem_size',
    'knn_index', 'nprobe', 'ef_search', 'mmap', 'trust_saved_index'}
# keys that make the memory text (MemorySource): the plain baseline does not vary with them
MEMORY_TEXT_KEYS = {'memory', 'bookkeeping_token', 'substitute', 'substitute_target', 'set_memory'}
# keys only activation addition reads
ACTADD_KEYS = {'actadd_prompts', 'actadd_layer', 'actadd_coeff'}
BASELINES = ('plain', 'context', 'actadd')
SHORT = dict(mem_frac='MF', bookkeeping_frac='BF', knn_softmax_influence='TS', resid_frac='r', top_k='top_k',
             temperature='T')
SETTING_FORMAT = 'sweep-setting'
SETTING_FORMAT_VERSION = 2  # 2: setting ids made from the run layer's types


# -----------------------------------------------------------------------------
# the grid and its settings

def sweep_seeds(config):
    """The run layer's rule: a count n gives seed, seed+1, ..., seed+n-1 (seed = 1337 by
    default); a list is used as is. None means DEFAULT_SEED_COUNT. metric='answer' samples
    nothing: no seeds."""
    if config['metric'] == 'answer':
        return []
    return seeds_of(dict(config, seeds=DEFAULT_SEED_COUNT if config['seeds'] is None else config['seeds']))


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
    """The grid as a list of (keys, list of value tuples), every value type-checked."""
    grid = config['grid']
    if not isinstance(grid, dict):
        raise UserError(f"grid={grid!r} must be a dict: key -> list of values")
    axes, seen = [], set()
    for key, values in grid.items():
        keys = tuple(key) if isinstance(key, tuple) else (key,)
        for k in keys:
            if not isinstance(k, str) or k not in DEFAULTS:
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


def layer_ranges(layers):
    """0,1,2,...,29 as '0-29'; runs of consecutive layers as a-b, the rest by commas."""
    runs = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ','.join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def fmt_value(key, v):
    if key == 'knn_num' and isinstance(v, (list, tuple)):
        layers = [i for i, k in enumerate(v) if k]
        if not layers:
            return 'no memory layers'
        ks = {v[i] for i in layers}
        where = 'layer' + ('s ' if len(layers) > 1 else ' ') + (','.join(map(str, layers)) if len(layers) <= 8 else
                                                                 layer_ranges(layers))
        return f"{where} k{ks.pop()}" if len(ks) == 1 else where + ' k ' + ','.join(str(v[i]) for i in layers)
    if key == 'exit_layer':
        return 'final output' if v is None else f"exit {v}"
    if key == 'contrast_layers':
        return 'final output' if v is None else f"exit {v[0]} contrasted with {v[1]}"
    if isinstance(v, float) and v == int(v):
        v = int(v)
    if key in SHORT:
        return f"{SHORT[key]} {v}"
    if key in ('substitute', 'answers', 'start', 'memory'):
        s = str(v).replace('\n', '\\n')
        return s if len(s) <= 24 else s[:21] + '...'
    return f"{key}={v}"


def setting_label(method, values, method_text=None, actadd=None):
    parts = []
    vals = dict(values)
    if method == 'actadd':  # its prompts, layer and coefficient, whether varied or not
        for k in ACTADD_KEYS:
            vals.pop(k, None)
        parts.append(f"actadd {'-'.join(actadd.prompts)} L{actadd.layer} c {fmt_value('', actadd.coeff).split('=')[-1]}")
    mode, threshold = vals.pop('memory_mode', None), vals.pop('memory_sim_threshold', None)
    if method == 'memory' and mode == 'attention':  # the selection keys do not apply to it
        for k in ('mem_frac', 'bookkeeping_frac', 'knn_softmax_influence', 'resid_only', 'resid_frac'):
            vals.pop(k, None)
        parts.append('retrieval attention' + (f" (cosine > {threshold})" if threshold is not None else ''))
    if method == 'memory' and 'resid_only' in vals and 'resid_frac' in vals:
        ro, r = vals.pop('resid_only'), vals.pop('resid_frac')
        t = 1 if not ro and not r else 2 if ro else 3
        parts.append(f"Type {t}" + (f" (r {fmt_value('', r).split('=')[-1]})" if r else ''))
    parts += [fmt_value(k, v) for k, v in vals.items()]
    if method not in ('memory', 'actadd'):
        parts.insert(0, method)
    if not parts and method_text and method_text != RUN_DEFAULTS.get('method_text'):
        return method_text
    return ', '.join(parts) if parts else 'memory'


def fixed_settings(config):
    """What every memory point of the sweep shares (the method's settings the grid does not vary,
    and the sampling), for the plots' titles."""
    varied = {k for key in config['grid'] for k in (key if isinstance(key, tuple) else (key,))}
    keys = ('resid_only', 'resid_frac', 'knn_num', 'mem_frac', 'bookkeeping_frac', 'knn_softmax_influence')
    method = setting_label('memory', {k: config[k] for k in keys if k not in varied and config[k] is not None})
    sampling = ', '.join(fmt_value(k, config[k]) for k in ('temperature', 'top_k') if k not in varied)
    return f"memory: {method}; {sampling}, {config['decoding']} decoding"


def digest(obj):
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()[:12]


def with_item(c, item, item_set):
    """The setting's config for one item of a set: its prompt, and for recall sets its answers
    and its memory text (its own document, or every document of the set with set_memory='all')."""
    c = dict(c, start=item.prompt)
    if item_set.kind == 'recall-set':
        if c['set_memory'] not in ('item', 'all'):
            raise UserError(f"set_memory={c['set_memory']!r} must be 'item' (each item's own document) or 'all'")
        docs = [item.document] if c['set_memory'] == 'item' else item_set.documents()
        c.update(memory=c['bookkeeping_token'] + c['bookkeeping_token'].join(docs), answers=list(item.answers))
    return c


def make_setting(config, method, values, seeds, item=None, item_set=None):
    """One setting of the sweep: `values` of the grid applied to the config for `method`, made
    into the run layer's types (every value checked here, before anything runs). Its id, on
    which resume depends, is a hash of exactly what decides its outputs: the model, the
    prompt, the seeds, the sampling, the scoring, and per method the memory text in the
    context or the memory, its retrieval settings and search."""
    where = (f"setting {method} {jsonable(values)}" if values else method) + (f", item {item.id}" if item else '')
    c = dict(config, **values)
    if item is not None:
        c = with_item(c, item, item_set)
    if method != 'memory':  # the baselines use no memory
        c.update({k: RUN_DEFAULTS[k] for k in RETRIEVAL_KEYS & set(RUN_DEFAULTS)})
    if method != 'actadd':
        c.update({k: SWEEP_DEFAULTS[k] for k in ACTADD_KEYS})
    sampling = Sampling.from_config(c, where)
    readout = readout_of(c)
    search = SearchSettings.from_config(c)
    check_device(c['device'])
    answers = answers_of(c) if c['metric'] in ('recall', 'answer') else None
    source = retrieval = context = actadd = None
    if method == 'actadd':
        actadd = ActAdd.from_config(c, where)
    if method == 'memory':
        if c['knn_num'] is None:
            raise UserError(f"{where}: the memory method needs knn_num (one k per layer)")
        retrieval = RetrievalSettings.from_config(c)  # the one way run configs become settings (sample.py's too)
        source = MemorySource.from_config(c, c['substitute'], c['substitute_target'])
    elif method == 'context':
        context = memory_text(c['memory'], c['bookkeeping_token'], c['substitute'], c['substitute_target'])
        if not context.strip():
            raise UserError("the 'context' baseline needs a memory text: set memory=... or memory=FILE:path")
    generation = dict(method=method, model=dict(init_from=c['init_from'], dtype=c['dtype']),
                      prompt=prompt_text(c['start']), seeds=seeds, sampling=asdict(sampling), context=context,
                      memory=source.as_dict() if source else None,
                      retrieval=retrieval.as_dict() if retrieval else None, search=search.search if retrieval else None)
    if item is not None:  # likewise for the settings of sets
        generation['item'] = item.id
    if actadd:  # only here, so the other methods' ids stay what they were before ActAdd existed
        generation['actadd'] = actadd.as_dict()
    if readout:  # likewise: settings that read the ordinary output keep their ids
        generation['readout'] = asdict(readout)
    if retrieval and not search.is_default():  # and those that search the memory's own index
        generation['index'] = dict(knn_index=search.knn_index, **search.params())
    columns = {k: None if (method != 'memory' and k in RETRIEVAL_KEYS) or (method != 'actadd' and k in ACTADD_KEYS)
               else jsonable(v) for k, v in c.items() if k != 'grid'}
    label = setting_label(method, values, c['method_text'], actadd)
    copy_source = memory_text(c['memory'], c['bookkeeping_token']) if c['metric'] == 'vader' and c['memory'] else ''
    return dict(id=digest(dict(generation, metric=c['metric'], answers=answers)), generation_id=digest(generation),
                method=method, values=values, label=label, copy_source=copy_source,
                item=item.id if item else None, split=item.split if item else None, unit=item.unit if item else None,
                kind=item.kind if item else None,
                setting=dict(method=method, **jsonable(values)), config=c, sampling=sampling, memory=source,
                retrieval=retrieval, search=search if retrieval else None, context=context, actadd=actadd, readout=readout, answers=answers, columns=columns)


def expand(config):
    """Every setting of the sweep, in order: the baselines first, then the grid (first key slowest)."""
    seeds = sweep_seeds(config)
    axes = grid_axes(config)
    baselines = config['baselines']
    if isinstance(baselines, str):
        baselines = [baselines]
    if not isinstance(baselines, (list, tuple)) or any(b not in BASELINES for b in baselines):
        raise UserError(f"baselines={baselines!r} must be a list of {', '.join(map(repr, BASELINES))}")
    keep_substitute = config['metric'] == 'recall' and config['answers'] is None
    points = []  # (method, grid values): the baselines first, then the grid
    for b in dict.fromkeys(baselines):
        ignore = set(RETRIEVAL_KEYS) | (ACTADD_KEYS if b != 'actadd' else set())
        if b in ('plain', 'actadd'):
            ignore |= MEMORY_TEXT_KEYS - ({'substitute'} if keep_substitute else set())
        b_axes = [(keys, vals) for keys, vals in axes if not set(keys) <= ignore]
        for combo in itertools.product(*[list(dict.fromkeys(vals)) for _, vals in b_axes]):
            points.append((b, {k: v for (keys, _), vs in zip(b_axes, combo) for k, v in zip(keys, vs)}))
    m_axes = [(keys, vals) for keys, vals in axes if not set(keys) <= ACTADD_KEYS]
    for combo in itertools.product(*[vals for _, vals in m_axes]):
        points.append(('memory', {k: v for (keys, _), vs in zip(m_axes, combo) for k, v in zip(keys, vs)}))
    item_set = set_of(config)
    settings = []
    for method, values in points:
        if item_set is None:
            settings.append(make_setting(config, method, values, seeds))
            continue
        group = digest(dict(method=method, values=values))  # the point of the grid; its items share it
        for item in items_of(item_set, config):
            s = make_setting(config, method, values, seeds, item, item_set)
            settings.append(dict(s, group=group, setting=dict(s['setting'], item=item.id)))
    unique = list({s['id']: s for s in reversed(settings)}.values())[::-1]  # first of each id, in order
    for i, s in enumerate(unique):
        s['index'] = i
    return unique, seeds


def set_of(config):
    """The sweep's item set (sets.py), checked against its metric, or None."""
    if not config['item_set']:
        return None
    if config['split'] not in ('dev', 'test', 'both'):
        raise UserError(f"split={config['split']!r} must be 'dev', 'test' or 'both'")
    item_set = load_set(config['item_set'])
    wanted = 'prompt-set' if config['metric'] == 'vader' else 'recall-set'
    if item_set.kind != wanted:
        raise UserError(f"item_set={config['item_set']!r} is a {item_set.kind}; metric={config['metric']!r} needs a {wanted}")
    if not item_set.of_split(config['split']):
        raise UserError(f"item_set={config['item_set']!r} has no {config['split']} items")
    return item_set


def items_of(item_set, config):
    """The items a set sweep runs, in the file's order: those of its split, only the first
    max_items of each split if given."""
    n = config['max_items']
    if not isinstance(n, int) or n < 0:
        raise UserError(f"max_items={n!r} must be a whole number >= 0 (0 = every item)")
    taken, chosen = {}, []
    for i in item_set.of_split(config['split']):
        if not n or taken.get(i.split, 0) < n:
            chosen.append(i)
            taken[i.split] = taken.get(i.split, 0) + 1
    return chosen


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


def sweep_record(name, config, seeds, settings):
    """sweep.json: what a folder's results are a sweep of (its seeds and settings)."""
    return json.dumps(dict(name=name, shard=config['shard'] or None, seeds=seeds, config=jsonable(config),
                           settings=[dict(index=s['index'], id=s['id'], label=s['label'], setting=s['setting'])
                                     for s in settings]), indent=1, ensure_ascii=False)


def check_same_sweep(run_dir, seeds, settings, extend):
    """Refuse to write into a folder that holds a sweep of other seeds or settings (a quick run
    with fewer seeds or tokens would otherwise replace published summaries and plots); with
    extend=True, settings may be added to those it holds."""
    path = os.path.join(run_dir, 'sweep.json')
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(run_dir, 'summary.csv')):
            raise UserError(f"{run_dir} holds results (summary.csv) but no sweep.json saying what they are; "
                            f"use another out_dir, or remove it to start again")
        return
    try:
        with open(path, encoding='utf-8') as f:
            old = json.load(f)
        old_seeds, old_ids = old['seeds'], {x['id'] for x in old['settings']}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a sweep record this code wrote; use another out_dir or remove it") from None
    ids = {s['id'] for s in settings}
    if old_seeds != seeds:
        raise UserError(f"{run_dir} holds this sweep with {len(old_seeds)} other seeds ({old_seeds[:3]}...), not these "
                        f"{len(seeds)}; use another out_dir (--out_dir=out/...), or --replace=True to start it again")
    if old_ids != ids and not (extend and old_ids <= ids):
        dropped, added = len(old_ids - ids), len(ids - old_ids)
        raise UserError(f"{run_dir} holds a sweep of other settings ({dropped} of its {len(old_ids)} are not in this "
                        f"grid, {added} of this grid's are new: other tokens, sampling or grid); use another out_dir"
                        + (", --extend=True to add the new settings," if not dropped else "") + " or --replace=True to "
                        "start it again")


SWEEP_FILES = ('sweep.json', 'results.csv', 'samples.jsonl', 'summary.csv', 'summary.txt', 'vader.png', 'recall.png',
               'quality.png', 'answer.png', 'items.csv', 'set.png')


def remove_sweep(run_dir):
    """replace=True: remove what a sweep writes in run_dir (its files, settings/ and shards/), nothing else."""
    for f in SWEEP_FILES:
        if os.path.isfile(os.path.join(run_dir, f)):
            os.remove(os.path.join(run_dir, f))
    for d in ('settings', 'shards'):
        for f in glob.glob(os.path.join(run_dir, d, '**', '*.json'), recursive=True) + \
                [os.path.join(sd, f) for sd in glob.glob(os.path.join(run_dir, d, '*')) for f in SWEEP_FILES]:
            if os.path.isfile(f):
                os.remove(f)
        for sub in sorted(glob.glob(os.path.join(run_dir, d, '**'), recursive=True), key=len, reverse=True):
            if os.path.isdir(sub) and not os.listdir(sub):
                os.rmdir(sub)


def load_finished(dirs, ids, seeds):
    """{setting id: record} of the settings files in dirs that belong to this sweep. A file that
    is unreadable, or whose rows are not one complete row per seed, is not trusted: its
    setting is run again."""
    found = {}
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, 'settings', '*.json'))):
            try:
                with open(f, encoding='utf-8') as fh:
                    rec = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                warnings.warn(f"{f} is unreadable; its setting will be run again", stacklevel=2)
                continue
            if not isinstance(rec, dict) or rec.get('format') != SETTING_FORMAT or rec.get('id') not in ids \
                    or rec['id'] in found:
                continue
            rows = rec.get('rows')
            if not isinstance(rows, list) or [r.get('seed') if isinstance(r, dict) else None for r in rows] != seeds \
                    or not all({'text', 'tokens', 'scores'} <= set(r) for r in rows):
                warnings.warn(f"{f} does not hold one complete row per seed; its setting will be run again", stacklevel=2)
                continue
            found[rec['id']] = rec
    return found


# -----------------------------------------------------------------------------
# running

class Runner:
    """Holds the model (reloaded only when init_from/dtype/device change), the memories (one
    per MemorySource, built once for the union of the layers its settings use, whose search
    indexes every setting then shares) and the continuations already generated in this run
    (a generation shared by several settings, e.g. one scored against several answers, runs once)."""

    def __init__(self, settings):
        self.model_key, self.model, self.enc = None, None, None
        self.memories, self.generations, self.steerings = {}, {}, {}
        self.layers = {}
        for s in settings:
            if s['memory'] is not None:
                self.layers.setdefault(s['memory'], set()).update(s['retrieval'].layers)

    def model_for(self, c):
        key = (c['init_from'], c['dtype'], c['device'])
        if key != self.model_key:
            self.model, self.enc = None, None
            self.memories.clear()
            self.steerings.clear()
            self.model, self.enc = load_model(c)
            self.model_key = key
        return self.model, self.enc

    def retrieval_for(self, s):
        """The retrieving layers of memory setting s."""
        if s['memory'] not in self.memories:
            layers = sorted(self.layers.get(s['memory'], set()) | set(s['retrieval'].layers))
            self.memories[s['memory']] = s['memory'].load(self.model, self.enc, layers, mmap=s['config']['mmap'],
                                                          trust_saved_index=s['config']['trust_saved_index'])
        return self.memories[s['memory']].retrieving_layers(s['retrieval'], s['config']['device'], s['search'])

    def steering_for(self, s):
        """The activation addition of actadd setting s (actadd.Steering), made once per ActAdd."""
        if s['actadd'] not in self.steerings:
            self.steerings[s['actadd']] = s['actadd'].steering(self.model, self.enc)
        return self.steerings[s['actadd']]

    def run(self, s, bar=None):
        """Generate and score setting s: its record, as saved in settings/<id>.json."""
        c = s['config']
        model, enc = self.model_for(c)
        start, ids = prompt_ids(c['start'], enc)
        seeds, sampling = s['seeds'], s['sampling']
        gen_ids = encode(enc, s['context'] + start) if s['method'] == 'context' else ids
        if len(gen_ids) + sampling.max_new_tokens > model.config.block_size:
            warnings.warn(f"setting '{s['label']}': {len(gen_ids)} prompt tokens + {sampling.max_new_tokens} new "
                          f"tokens exceed block_size {model.config.block_size}; the context is cropped to its last "
                          f"{model.config.block_size} tokens", stacklevel=2)
        t0 = time.time()
        # a memory setting whose knn_num is all 0 ('no memory layers') runs the plain model
        retrieval = self.retrieval_for(s) if s['method'] == 'memory' and s['retrieval'].layers else None
        steering = self.steering_for(s) if s['method'] == 'actadd' else None
        conts = self.generations.get(s['generation_id'])
        if conts is not None:
            if bar is not None:
                bar.update(sampling.max_new_tokens * self.batches(len(seeds), c))
        else:
            bs = c['batch_size'] or max(len(seeds), 1)
            conts = []
            with torch.no_grad():
                for i in range(0, len(seeds), bs):
                    conts += continuations(model, gen_ids, seeds[i:i + bs], sampling, retrieval, progress=bar,
                                           steering=steering, readout=s['readout'])
            self.generations[s['generation_id']] = conts
        t_gen = time.time() - t0
        texts = [enc.decode(t) for t in conts]
        memory = self.memories[s['memory']].describe(s['memory'].store) if retrieval else None
        scores = score_rows(c['metric'], s['answers'], texts, conts, perplexities(model, ids, conts), s['copy_source'])
        answer = None
        if c['metric'] in ('recall', 'answer'):  # the answers' probability too: one teacher-forced pass, no sampling
            text = (s['context'] + start) if s['method'] == 'context' else start
            with torch.no_grad():
                answer = answer_scores(model, enc, text, gen_ids, s['answers'], sampling.decoding, retrieval, steering,
                                       s['readout'])
        return dict(format=SETTING_FORMAT, format_version=SETTING_FORMAT_VERSION, id=s['id'], index=s['index'],
                    method=s['method'], setting=s['setting'], label=s['label'], metric=c['metric'],
                    answers=s['answers'], prompt=start, prompt_tokens=len(gen_ids),
                    config=jsonable({k: v for k, v in c.items() if k != 'grid'}),
                    model=dict(name=model.name, fingerprint=model.fingerprint()), device=c['device'],
                    produced_by=dict(sampling=asdict(sampling), memory=memory,
                                     retrieval=s['retrieval'].as_dict() if memory else None,
                                     search=s['search'].backend(c['device']) if memory else None,
                                     **(dict(knn_index=s['search'].index_for(self.memories[s['memory']].knn_index),
                                             index_params=s['search'].params())
                                        if memory and not s['search'].is_default() else {}),
                                     actadd=s['actadd'].as_dict() if s['actadd'] else None,
                                     readout=asdict(s['readout']) if s['readout'] else None,
                                     context=s['context']),
                    generation_s=round(t_gen, 3), seeds=seeds,
                    **(dict(item=s['item'], split=s['split'], unit=s['unit'], kind=s['kind'], group=s['group'])
                       if s['item'] else {}), **(dict(answer_scores=answer) if answer else {}),
                    rows=[dict(seed=sd, text=t, tokens=tk, scores=sc)
                          for sd, t, tk, sc in zip(seeds, texts, conts, scores)])

    @staticmethod
    def batches(n, c):
        bs = c['batch_size'] or max(n, 1)
        return (n + bs - 1) // bs


def write_all(run_dir, config, name, settings, seeds, finished):
    """Rewrite the combined files from the finished settings: report.py's, or for a set sweep
    results.csv and samples.jsonl with set_report.py's summaries. (summary, text, plots, table)."""
    if not config['item_set']:
        return report.write_outputs(run_dir, config, name, settings, seeds, finished, fixed_settings(config))
    table = report.write_records(run_dir, config['metric'], settings, finished)
    model = next((r['model']['name'] for r in finished.values()), config['init_from'])
    n_items = len({s['item'] for s in settings})
    how = 'p(answer), teacher-forced' if config['metric'] == 'answer' else \
        f"{len(seeds)} seeds x {config['max_new_tokens']} tokens"
    title = config['plot_title'] or f"{name}: {model}, {n_items} items of {config['item_set']}, {how}"
    return (*set_report.write_set_outputs(run_dir, config, settings, finished, title), table)


def sweep_name(config, argv):
    if config['name']:
        return config['name']
    files = [a for a in argv if not a.startswith('--')]
    if not files:
        return 'sweep'
    stem = os.path.splitext(os.path.basename(files[-1]))[0]
    return stem[len('sweep_'):] if stem.startswith('sweep_') and len(stem) > 6 else stem


def run_settings(todo, config, name, run_dir, mine, seeds, finished, wb, everything):
    """Run the unfinished settings one by one, each saved whole before the next starts. Every
    memory setting is first checked against its model and memory (knn_num's length, the
    layers the memory holds), so a bad one stops the sweep before anything is generated. A
    memory is built for the layers of all the sweep's settings that share it (everything), so
    its record is the same in a shard, a resumed run and one whole run."""
    runner = Runner(everything)
    if config['item_set']:  # item by item, each item's memory dropped when its last setting is done
        order = {item: n for n, item in enumerate(dict.fromkeys(s['item'] for s in everything))}
        todo = sorted(todo, key=lambda s: order[s['item']])
    uses = {}
    for s in todo:
        if s['method'] == 'memory' and s['retrieval'].layers:
            uses[s['memory']] = uses.get(s['memory'], 0) + 1
    checked = set()
    for s in todo:
        key = (s.get('group') or s['id'], s['config']['init_from'])  # a set's items: the first of each grid point
        if s['method'] == 'memory' and s['retrieval'].layers and key not in checked:
            checked.add(key)
            runner.model_for(s['config'])
            runner.retrieval_for(s)  # Memory.retrieving_layers checks knn_num against the model's layers
        if s['method'] == 'actadd':
            runner.model_for(s['config'])
            steering = runner.steering_for(s)  # checks the layer against the model's blocks
            steering.check_prompt(len(prompt_ids(s['config']['start'], runner.enc)[1]))
    fingerprint, written = None, time.time()
    with tqdm(total=len(todo), desc='settings', unit='setting', file=sys.stderr, position=0) as sbar:
        for s in todo:
            c = s['config']
            with tqdm(total=c['max_new_tokens'] * Runner.batches(len(seeds), c), desc=s['label'][:30], unit='tok',
                      file=sys.stderr, position=1, leave=False, disable=not seeds) as tbar:
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
            if s['method'] == 'memory' and s['retrieval'].layers:
                uses[s['memory']] -= 1
                if not uses[s['memory']] and config['item_set']:
                    runner.memories.pop(s['memory'], None)
            if not config['item_set'] or time.time() - written > 30:  # a set's many small settings: every 30 s
                summary, _, _, _ = write_all(run_dir, config, name, mine, seeds, finished)
                written = time.time()
            if wb and not config['item_set']:
                wb.setting(next(r for r in summary if r['setting_id'] == s['id']))
            sbar.update(1)


def main(argv):
    config = configure(DEFAULTS, argv, __doc__, [sys.modules[__name__], run_config, os.path.join(REPOSITORY, 'launch.py')])
    if config['metric'] not in ('vader', 'recall', 'answer'):
        raise UserError(f"metric={config['metric']!r} must be 'vader', 'recall' or 'answer'")
    if config['batch_size'] < 0:
        raise UserError(f"batch_size={config['batch_size']} must be >= 0 (0 = all seeds in one batch)")
    name = sweep_name(config, argv)
    out_dir = config['out_dir'] or os.path.join('out', name)
    check_outside_memories(out_dir, 'out_dir')
    settings, seeds = expand(config)
    for s in settings:
        s['seeds'] = seeds
    bad = [p for p in config['vader_parts'] if p not in VADER_SCORES]
    if bad or not config['vader_parts']:
        raise UserError(f"vader_parts={config['vader_parts']!r}: give one or more of {VADER_SCORES}")
    shard = parse_shard(config['shard'])
    check_launch(config)
    if config['launcher']:
        return launch(config, name, out_dir, settings, seeds, argv)
    if config['replot']:
        if config['item_set']:
            raise UserError("replot redraws the plots of one prompt's sweep; a set sweep's set.png is redrawn by "
                            "running it again (finished settings are not run again)")
        return replot(config, name, out_dir, settings, seeds)
    if config['merge']:
        if shard:
            raise UserError("merge=True joins the shards; give it without --shard")
        return merge(config, name, out_dir, settings, seeds)
    run_dir = os.path.join(out_dir, 'shards', f"{shard[0]}-of-{shard[1]}") if shard else out_dir
    mine = [s for s in settings if shard is None or s['index'] % shard[1] == shard[0]]
    # a run that fails before any setting is finished (a model that cannot load, say) leaves nothing behind
    fresh = out_dir if not os.path.exists(out_dir) else run_dir if not os.path.exists(run_dir) else None
    if config['replace']:
        remove_sweep(run_dir)
    check_same_sweep(run_dir, seeds, settings, config['extend'])
    try:
        write_whole(os.path.join(run_dir, 'sweep.json'), sweep_record(name, config, seeds, settings))
        finished = load_finished([run_dir], {s['id'] for s in settings}, seeds)
        todo = [s for s in mine if s['id'] not in finished]
        print(f"sweep {name}: {len(settings)} settings x {len(seeds)} seeds"
              + (f", shard {shard[0]}/{shard[1]}: {len(mine)} settings" if shard else '')
              + f"; {len(mine) - len(todo)} already finished, {len(todo)} to run; output in {run_dir}", file=sys.stderr)
        wb = report.WandbLog(config, config['wandb_run_name'] or name + (f"-shard{shard[0]}of{shard[1]}" if shard else '')) \
            if config['wandb_log'] else None
        run_settings(todo, config, name, run_dir, mine, seeds, finished, wb, settings)
    except BaseException:
        if fresh and not glob.glob(os.path.join(run_dir, 'settings', '*.json')):
            shutil.rmtree(fresh, ignore_errors=True)
        raise
    summary, text, plots, table = write_all(run_dir, config, name, mine, seeds, finished)
    print(text, end='')
    print(f"wrote {', '.join(os.path.join(run_dir, f) for f in ['results.csv', 'samples.jsonl', 'summary.csv', 'summary.txt'])}"
          + (', ' + ', '.join(plots) if plots else ''))
    if shard:
        print(f"when every shard is done, join them: python sweep.py {' '.join(a for a in argv if not a.startswith('--shard'))} --merge=True")
    if wb:
        wb.finish(summary, table, plots)


def launch(config, name, out_dir, settings, seeds, argv):
    """The sweep's shards as jobs (launch.py), each `python sweep.py ARGV --shard=i/n` resuming
    from its finished settings; with wait=True, merged into out_dir when all are done."""
    if config['shard'] or config['merge'] or config['replot']:
        raise UserError("launcher runs the shards itself and merges them; give it without shard, merge or replot")
    if config['replace']:
        remove_sweep(out_dir)
    check_same_sweep(out_dir, seeds, settings, config['extend'])
    child = shard_argv(argv, {'shard', 'replace'})
    failed = launch_shards(config, os.path.join(REPOSITORY, 'sweep.py'), child, os.path.join(out_dir, 'jobs'))
    if not config['wait']:
        print(f"when the jobs are done, join them: python sweep.py {' '.join(child[:-2])} --merge=True")
        return
    if failed:
        n = config['shards']
        raise UserError(f"{len(failed)} of {n} shards failed ({', '.join(f'{i}/{n}' for i in failed)}); "
                        f"their logs are named above; run the same command again to retry them (finished settings are kept)")
    merge(config, name, out_dir, settings, seeds)


def replot(config, name, out_dir, settings, seeds):
    """Draw out_dir's plots again from its samples.jsonl, which holds every continuation's
    scores (the published folders keep it; their per-setting files are not kept)."""
    path = os.path.join(out_dir, 'samples.jsonl')
    check_same_sweep(out_dir, seeds, settings, False)
    if not os.path.isfile(path):
        raise UserError(f"nothing to replot: {path} does not exist (run the sweep first)")
    finished = {}
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                rec = finished.setdefault(r['setting_id'], dict(model=r['model'], rows=[]))
                rec['rows'].append(dict(seed=r['seed'], text=r['text'], tokens=r['tokens'], scores=r['scores']))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path} line {n} is not a sample record this code wrote") from None
    missing = [s['label'] for s in settings if s['id'] not in finished]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} of the sweep's settings ({', '.join(missing[:5])}); "
                        f"replot needs the sweep these samples came from")
    title = report.default_title(config, name, seeds, finished, fixed_settings(config))
    plots = report.make_plots(out_dir, config['metric'], settings, finished, title, config['vader_parts'])
    print(f"wrote {', '.join(plots)}")


def merge(config, name, out_dir, settings, seeds):
    """Join out_dir/shards/*/settings into out_dir: the same files a single run writes."""
    shard_dirs = sorted(d for d in glob.glob(os.path.join(out_dir, 'shards', '*')) if os.path.isdir(d))
    if not shard_dirs and not os.path.isdir(os.path.join(out_dir, 'settings')):
        raise UserError(f"nothing to merge: {out_dir}/shards/ holds no shard folders (run with --shard=i/n first, "
                        f"or copy the machines' {out_dir}/shards/* here)")
    finished = load_finished([out_dir] + shard_dirs, {s['id'] for s in settings}, seeds)
    fps = {(r['model']['name'], r['model']['fingerprint']) for r in finished.values()}
    if len({n for n, _ in fps}) < len(fps):
        raise UserError(f"the shards were run with different weights of the same model ({sorted(fps)}); rerun them alike")
    check_same_sweep(out_dir, seeds, settings, config['extend'])
    write_whole(os.path.join(out_dir, 'sweep.json'), sweep_record(name, dict(config, shard=''), seeds, settings))
    for sid, rec in finished.items():
        path = os.path.join(out_dir, 'settings', f"{sid}.json")
        if not os.path.isfile(path):
            write_whole(path, json.dumps(rec, ensure_ascii=False))
    summary, text, plots, table = write_all(out_dir, config, name, settings, seeds, finished)
    missing = [s for s in settings if s['id'] not in finished]
    print(text, end='')
    print(f"merged {len(finished)} of {len(settings)} settings from {len(shard_dirs)} shard folder(s) into {out_dir}")
    if missing:
        n = len(settings)
        shards = sorted({d.rsplit('-of-', 1)[-1] for d in map(os.path.basename, shard_dirs) if '-of-' in d})
        where = f" (shards i/{shards[0]}: " + ', '.join(sorted({f"{s['index'] % int(shards[0])}/{shards[0]}" for s in missing}))\
            + ")" if len(shards) == 1 else ''
        raise UserError(f"missing {len(missing)} of {n} settings{where}: "
                        + '; '.join(f"{s['index']} ({s['label']})" for s in missing[:10])
                        + (' ...' if len(missing) > 10 else '') + "; run them, then merge again")
    if config['wandb_log']:
        report.WandbLog(config, config['wandb_run_name'] or name).finish(summary, table, plots)


if __name__ == '__main__':
    run_cli(main)
