"""Sweeps on the tiny checkpoint: batched == one-by-one generation, the scores, the files,
resume, shards and merge, wandb offline. The whole file runs in well under a minute."""
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'reference', 'tiny-gpt2')
sys.path.insert(0, ROOT)

import scores  # noqa: E402
import sweep  # noqa: E402
from configurator import UserError, configure  # noqa: E402
from conftest import one_line_error, run_script
from memory import RetrievalSettings  # noqa: E402
from run import RUN_DEFAULTS, Sampling, continuations, load_model, prepare_memory, prompt_ids  # noqa: E402

MEMORY = ("\nCats are curious animals that sleep for most of the day and play at night. "
          "Dogs and cats can live together when they are introduced slowly and kindly.")
VANCOUVER = ("\nLocated in British Columbia, Vancouver is a major city in western Canada. "
             "The Metro Vancouver area is the third-largest metropolitan area in Canada.")
RECALL_PROMPT = "\nThe name of the city with the third-largest metropolitan area in Canada is"
# the method types of docs/method.md on the 4-layer tiny model (the fixture's reference cases)
TYPES = {
    'type1': dict(knn_num=[2, 2, 2, 2], mem_frac=1.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0,
                  resid_only=False, resid_frac=0.0),
    'type2': dict(knn_num=[0, 0, 5, 0], mem_frac=0.0, bookkeeping_frac=0.03, knn_softmax_influence=1000.0,
                  resid_only=True, resid_frac=0.1),
    'type3': dict(knn_num=[0, 3, 3, 0], mem_frac=5.0, bookkeeping_frac=0.1, knn_softmax_influence=0.01,
                  resid_only=False, resid_frac=0.33),
}
VADER_SWEEP = f"""
init_from = {TINY!r}
memory = {MEMORY!r}
start = "\\nCats are horrible"
knn_num = [0, 3, 3, 0]
mem_frac = 5.0
bookkeeping_frac = 0.1
knn_softmax_influence = 0.01
resid_frac = 0.33
seeds = 3
max_new_tokens = 16
metric = 'vader'
grid = {{'knn_num': [[0, 3, 3, 0], [2, 2, 2, 2]]}}
baselines = ['plain']
"""
RECALL_SWEEP = f"""
init_from = {TINY!r}
memory = {VANCOUVER!r}
start = "\\nThe name of the city with the third-largest metropolitan area in Canada is"
knn_num = [0, 0, 5, 0]
mem_frac = 0.0
bookkeeping_frac = 0.03
knn_softmax_influence = 1000
resid_only = True
resid_frac = 0.1
seeds = [1337, 1338, 1341, 1342]
max_new_tokens = 10
metric = 'recall'
grid = {{'substitute': ['lib', 'at']}}   # answer = the word that replaces Vancouver
baselines = ['plain', 'context']
"""


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core machine torch's thread
    pool slows its small ops down many times over; the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def tiny():
    cfg = dict(RUN_DEFAULTS, init_from=TINY)
    return load_model(cfg)


def generate(model, enc, config, seeds):
    """sample.py's generation for a config: its memory (built as sample.py builds it), its seeds as one batch."""
    settings = RetrievalSettings.from_config(config, model.config.n_layer)
    memory = prepare_memory(config, model, enc, settings, progress=False)
    retrieval = memory.retrieving_layers(settings) if memory else None
    _, ids = prompt_ids(config['start'], enc)
    return continuations(model, ids, seeds, Sampling.from_config(config), retrieval)


def write_config(tmp_path, name, text):
    path = tmp_path / f'sweep_{name}.py'
    path.write_text(text, encoding='utf-8')
    return str(path)


def read_csv(path):
    with open(path, encoding='utf-8', newline='') as f:
        return list(csv.DictReader(f))


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def run_cli(*args, env=None):
    full_env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sweep.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=300)


# --- batched generation -----------------------------------------------------------

@pytest.mark.parametrize('decoding', ['exact', 'cached'])
@pytest.mark.parametrize('kind', ['plain', 'type1', 'type2', 'type3'])
def test_batch_equals_one_by_one(tiny, kind, decoding):
    """All seeds as one batch give exactly what each seed gives alone, for every method type."""
    model, enc = tiny
    memory_text, start = (VANCOUVER, RECALL_PROMPT) if kind == 'type2' else (MEMORY, '\nCats are horrible')
    config = dict(RUN_DEFAULTS, init_from=TINY, memory=memory_text, start=start, max_new_tokens=20,
                  decoding=decoding, **TYPES.get(kind, {}))
    settings = RetrievalSettings.from_config(config, model.config.n_layer)
    memory = prepare_memory(config, model, enc, settings, progress=False)
    assert (memory is None) == (kind == 'plain')
    retrieval = memory.retrieving_layers(settings) if memory else None
    _, ids = prompt_ids(start, enc)
    seeds = [1337, 1338, 2658, 8932]
    sampling = Sampling.from_config(config)
    batched = continuations(model, ids, seeds, sampling, retrieval)
    for seed, row in zip(seeds, batched):
        assert continuations(model, ids, [seed], sampling, retrieval) == [row], seed
    if kind != 'plain':  # the memory does change what is generated
        assert batched != continuations(model, ids, seeds, sampling, None)


# --- scores ---------------------------------------------------------------------


# --- configs and settings -----------------------------------------------------------

def test_seeds_grid_and_labels():
    cfg = dict(sweep.DEFAULTS)
    assert sweep.sweep_seeds(cfg) == list(range(1337, 1437))
    assert sweep.sweep_seeds(dict(cfg, seeds=3)) == [1337, 1338, 1339]
    assert sweep.sweep_seeds(dict(cfg, seeds=[5, 9])) == [5, 9]
    with pytest.raises(UserError, match='repeats a seed'):
        sweep.sweep_seeds(dict(cfg, seeds=[5, 5]))
    cfg.update(init_from=TINY, memory=MEMORY, baselines=['plain', 'context'], knn_num=[2, 2, 2, 2],
               grid={('resid_only', 'resid_frac'): [(False, 0), (True, 0.1), (False, 0.1)], 'mem_frac': [1, 5]})
    settings, _ = sweep.expand(cfg)
    labels = [s['label'] for s in settings]
    # the baselines do not vary with retrieval-only keys: one each
    assert labels[:2] == ['plain', 'context']
    assert labels[2:] == ['Type 1, MF 1', 'Type 1, MF 5', 'Type 2 (r 0.1), MF 1', 'Type 2 (r 0.1), MF 5',
                          'Type 3 (r 0.1), MF 1', 'Type 3 (r 0.1), MF 5']
    assert settings[2]['setting'] == dict(method='memory', resid_only=False, resid_frac=0.0, mem_frac=1.0)
    assert len({s['id'] for s in settings}) == len(settings)
    assert sweep.fmt_value('knn_num', [0] * 6 + [5, 5, 5, 0, 0, 0]) == 'layers 6,7,8 k5'
    assert sweep.fmt_value('knn_num', [5] * 10 + [0, 5, 5]) == 'layers 0-9,11-12 k5'  # more than 8: ranges
    with pytest.raises(UserError, match='did you mean mem_frac'):
        sweep.expand(dict(cfg, grid={'mem_fracc': [1]}))
    with pytest.raises(UserError, match='describes the sweep'):
        sweep.expand(dict(cfg, grid={'seeds': [1]}))


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli('--init_from=' + TINY, '--grid={"knn_numm": [[0,0,5,0]]}', f'--out_dir={tmp_path}')
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'did you mean knn_num' in r.stderr
    r = run_cli('--init_from=' + TINY, '--metric=recall', f'--out_dir={tmp_path}')
    assert r.returncode == 2 and 'answers' in r.stderr


# --- end to end ------------------------------------------------------------------

def check_outputs(out, metric, n_settings, seeds):
    rows = read_csv(out / 'results.csv')
    samples = read_jsonl(out / 'samples.jsonl')
    assert len(rows) == len(samples) == n_settings * len(seeds)
    assert [int(r['seed']) for r in rows] == seeds * n_settings
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from model import GPT
    enc = GPT.from_pretrained(TINY)[1]
    vader = SentimentIntensityAnalyzer()
    for row, s in zip(rows, samples):
        assert {'setting', 'seed', 'text', 'tokens'} <= set(s)
        assert row['label'] == s['label'] and int(row['seed']) == s['seed']
        assert enc.decode(s['tokens']) == s['text']
        for k, v in s['setting'].items():
            if k != 'method':
                assert json.loads(row[k]) == v if isinstance(v, list) else row[k] == str(v)
        for n in (1, 2, 3):
            assert float(row[f'distinct_{n}']) == pytest.approx(scores.distinct_n(s['tokens'], n))
        assert float(row['perplexity']) > 1
        if metric == 'vader':
            expected = vader.polarity_scores(s['text'])  # recomputed from the text
            for k in ('compound', 'pos', 'neu', 'neg'):
                assert float(row[k]) == pytest.approx(expected[k])
            assert int(row['positive']) == int(expected['compound'] >= 0.05)
    summary = read_csv(out / 'summary.csv')
    assert len(summary) == n_settings
    for srow in summary:
        mine = [r for r in rows if r['setting_id'] == srow['setting_id']]
        assert int(srow['seeds']) == len(mine) == len(seeds)
        if metric == 'vader':
            c = np.array([float(r['compound']) for r in mine])
            assert float(srow['compound_median']) == pytest.approx(np.median(c))
            assert float(srow['compound_iqr']) == pytest.approx(np.percentile(c, 75) - np.percentile(c, 25))
            assert float(srow['compound_mean']) == pytest.approx(c.mean())
            assert float(srow['frac_positive']) == pytest.approx(np.mean(c >= 0.05))
        else:
            assert int(srow['successes']) == sum(int(r['success']) for r in mine)
    for png in (['vader.png'] if metric == 'vader' else ['recall.png']) + ['quality.png']:
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (out / 'summary.txt').read_text(encoding='utf-8').splitlines()[0].startswith('setting')
    return rows, samples


def test_vader_sweep_files_numbers_and_resume(tmp_path, tiny, monkeypatch, capsys):
    cfg = write_config(tmp_path, 'tinyv', VADER_SWEEP)
    out = tmp_path / 'out'
    calls = []
    real_run = sweep.Runner.run

    def interrupted(self, s, bar=None):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(s['label'])
        return real_run(self, s, bar)

    monkeypatch.setattr(sweep.Runner, 'run', interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.main([cfg, f'--out_dir={out}'])
    # the two finished settings are saved whole, the third is not there at all
    assert len(list((out / 'settings').glob('*.json'))) == 2
    assert len(read_csv(out / 'results.csv')) == 2 * 3
    monkeypatch.setattr(sweep.Runner, 'run', lambda self, s, bar=None: (calls.append(s['label']), real_run(self, s, bar))[1])
    calls.clear()
    sweep.main([cfg, f'--out_dir={out}'])
    assert calls == ['layers 0,1,2,3 k2']  # only the unfinished one ran
    printed = capsys.readouterr().out
    assert 'plain' in printed and 'compound med' in printed
    rows, samples = check_outputs(out, 'vader', 3, [1337, 1338, 1339])
    assert [r['label'] for r in rows[::3]] == ['plain', 'layers 1,2 k3', 'layers 0,1,2,3 k2']
    # the memory setting's rows are what sample.py's generate gives for each seed alone
    model, enc = tiny
    c = configure(sweep.DEFAULTS, [cfg])
    assert generate(model, enc, dict(c, knn_num=[2, 2, 2, 2]), [1338])[0] == samples[2 * 3 + 1]['tokens']
    # a rerun runs nothing and writes the same results
    before = (out / 'results.csv').read_text()
    calls.clear()
    sweep.main([cfg, f'--out_dir={out}'])
    assert calls == [] and (out / 'results.csv').read_text() == before


def test_recall_sweep_substitute_shards_and_merge(tmp_path):
    cfg = write_config(tmp_path, 'tinyr', RECALL_SWEEP)
    single, sharded = tmp_path / 'single', tmp_path / 'sharded'
    sweep.main([cfg, f'--out_dir={single}'])
    rows, samples = check_outputs(single, 'recall', 6, [1337, 1338, 1341, 1342])
    labels = [r['label'] for r in rows[::4]]
    assert labels == ['plain, lib', 'plain, at', 'context, lib', 'context, at', 'lib', 'at']
    for row, s in zip(rows, samples):
        answer = s['setting']['substitute']  # answers default to the substitute word
        expected = s['text'].lstrip().lower().startswith(answer) and not s['text'].lstrip()[len(answer):][:1].isalnum()
        assert int(row['success']) == int(expected)
    success = {lab: sum(int(r['success']) for r in rows if r['label'] == lab) for lab in labels}
    # plain: seed 1338 starts " lib:", seed 1341 "at mountai..." -- one success each
    assert success['plain, lib'] == 1 and success['plain, at'] == 1
    # the context baseline's prompt is the memory text (substitute applied) then the question
    rec = json.loads(next((single / 'settings').glob('*.json')).read_text())
    ctx = [json.loads(p.read_text()) for p in (single / 'settings').glob('*.json')]
    ctx = [r for r in ctx if r['method'] == 'context' and r['setting']['substitute'] == 'lib'][0]
    from model import GPT
    enc = GPT.from_pretrained(TINY)[1]
    assert ctx['prompt_tokens'] == len(enc.encode(VANCOUVER.replace('Vancouver', 'lib') + ctx['prompt']))
    assert rec['model']['name'] == 'tiny-gpt2'
    # two shards, then merge: the same files as the single run
    for i in range(2):
        sweep.main([cfg, f'--out_dir={sharded}', f'--shard={i}/2'])
        assert len(read_csv(sharded / 'shards' / f'{i}-of-2' / 'results.csv')) == 3 * 4
    assert not (sharded / 'results.csv').exists()
    sweep.main([cfg, f'--out_dir={sharded}', '--merge=True'])
    for f in ('results.csv', 'samples.jsonl', 'summary.csv', 'summary.txt'):
        assert (sharded / f).read_text() == (single / f).read_text(), f


def test_wandb_offline(tmp_path):
    if importlib.util.find_spec('wandb') is None:
        pytest.skip('wandb is not installed (pip install wandb) - wandb_log cannot be tested')
    cfg = write_config(tmp_path, 'tinyw', VADER_SWEEP.replace('seeds = 3', 'seeds = 2'))
    r = run_cli(cfg, f'--out_dir={tmp_path / "out"}', '--wandb_log=True', '--grid={}',
                env=dict(WANDB_MODE='offline', WANDB_DIR=str(tmp_path), WANDB_SILENT='true'))
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / 'wandb').glob('offline-run-*'))
    assert len(runs) == 1
    assert list(runs[0].glob('*.wandb'))
    media = runs[0] / 'files' / 'media'
    assert sorted(p.name.split('_')[0] for p in (media / 'images' / 'plots').glob('*.png')) == ['quality', 'vader']
    assert sorted(p.name.split('_')[0] for p in (media / 'table').glob('*.table.json')) == ['results', 'summary']
    assert len(read_csv(tmp_path / 'out' / 'results.csv')) == 2 * 2


def test_sweep_with_a_file_memory_builds_what_sample_py_builds(tmp_path, monkeypatch):
    """One rule for a FILE: memory (the bookkeeping token put in front): the sweep's memory is
    the one sample.py stores, tensor for tensor, and its continuations are sample.py's."""
    text = tmp_path / 'cats.txt'
    text.write_text(MEMORY[1:] + '\n', encoding='utf-8')
    common = [f'--init_from={TINY}', f'--memory=FILE:{text}', '--knn_num=[0,3,3,0]', '--mem_frac=5.0',
              '--bookkeeping_frac=0.1', '--knn_softmax_influence=0.01', '--resid_frac=0.33',
              '--start=\nCats are horrible', '--seeds=[1337,1338]', '--max_new_tokens=12']
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), *common, '--store_mem=True',
                        f'--mem_store={tmp_path / "sample_mem"}', f'--out_jsonl={tmp_path / "sample.jsonl"}'],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert r.returncode == 0, r.stderr
    built = []
    real_load = sweep.MemorySource.load
    monkeypatch.setattr(sweep.MemorySource, 'load', lambda self, *a, **k: built.append(real_load(self, *a, **k)) or built[-1])
    sweep.main([*common, f'--out_dir={tmp_path / "sweep"}', '--plots=False'])
    from store import load_memory
    model, enc = load_model(dict(RUN_DEFAULTS, init_from=TINY))
    stored = load_memory(str(tmp_path / 'sample_mem'), model, enc)
    assert len(built) == 1 and built[0].meta['text'] == stored.meta['text'] == MEMORY
    assert built[0].meta['token_windows'] == stored.meta['token_windows']
    for layer in (1, 2):
        assert torch.equal(built[0].keys[layer], stored.keys[layer])
        assert torch.equal(built[0].values[layer], stored.values[layer])
    from_sample = [json.loads(line)['tokens'] for line in (tmp_path / 'sample.jsonl').read_text().splitlines()]
    assert [s['tokens'] for s in read_jsonl(tmp_path / 'sweep' / 'samples.jsonl')] == from_sample


def test_settings_of_one_memory_share_its_search_indexes(tmp_path, monkeypatch):
    """A sweep over MF, TS, k and layers of one memory builds each layer's search index once."""
    import knn_index
    built = []
    real_init = knn_index.KNNIndex.__init__
    monkeypatch.setattr(knn_index.KNNIndex, '__init__', lambda self, keys, kind, *a: built.append(kind) or real_init(self, keys, kind, *a))
    cfg = write_config(tmp_path, 'share', VADER_SWEEP.replace('seeds = 3', 'seeds = 2').replace('max_new_tokens = 16', 'max_new_tokens = 4'))
    sweep.main([cfg, f'--out_dir={tmp_path / "out"}', '--plots=False', '--search=faiss',
                "--grid={'mem_frac': [1.0, 5.0], 'knn_softmax_influence': [0.01, 1.0], "
                "'knn_num': [[0, 3, 3, 0], [0, 2, 0, 0]]}"])
    assert len(read_csv(tmp_path / 'out' / 'summary.csv')) == 1 + 2 * 2 * 2
    assert built == ['faiss', 'faiss']  # layers 1 and 2, once each


# a small sweep for the failure tests; each appends its own grid
SWEEP = VADER_SWEEP.replace('seeds = 3', 'seeds = 2').replace('max_new_tokens = 16', 'max_new_tokens = 4') + "plots = False\n"


def sweep_cli(*args):
    return run_script('sweep.py', *args)


def test_a_bad_grid_setting_stops_the_sweep_before_anything_runs(tmp_path):
    cfg = tmp_path / 'sweep_bad.py'
    cfg.write_text(SWEEP + "grid = {'knn_num': [[0, 3, 3, 0], [0, 3, 3]]}\n")
    one_line_error(sweep_cli(str(cfg), f'--out_dir={tmp_path / "out"}'), 'knn_num has 3 entries, the model has 4 layers')
    assert not (tmp_path / 'out' / 'settings').exists()
    cfg.write_text(SWEEP + "grid = {'mem_frac': [1.0, float('nan')]}\n")
    one_line_error(sweep_cli(str(cfg), f'--out_dir={tmp_path / "out"}'), 'mem_frac=nan must be a number from 0 to')
    assert not (tmp_path / 'out' / 'settings').exists()


def test_a_settings_file_that_lost_rows_is_rerun_and_a_merge_with_missing_shards_fails(tmp_path):
    cfg = tmp_path / 'sweep_rows.py'
    cfg.write_text(SWEEP + "grid = {'mem_frac': [1.0, 5.0]}\n")
    out = tmp_path / 'out'
    assert sweep_cli(str(cfg), f'--out_dir={out}').returncode == 0
    files = sorted((out / 'settings').glob('*.json'))
    rec = json.loads(files[0].read_text())
    rec['rows'] = rec['rows'][:1]
    files[0].write_text(json.dumps(rec))
    r = sweep_cli(str(cfg), f'--out_dir={out}')
    assert r.returncode == 0 and 'does not hold one complete row per seed' in r.stderr
    assert '2 already finished, 1 to run' in r.stderr
    assert len(json.loads(files[0].read_text())['rows']) == 2
    sharded = tmp_path / 'sharded'
    assert sweep_cli(str(cfg), f'--out_dir={sharded}', '--shard=0/3').returncode == 0
    r = sweep_cli(str(cfg), f'--out_dir={sharded}', '--merge=True')
    one_line_error(r, 'missing 2 of 3 settings (shards i/3: 1/3, 2/3)', 'run them, then merge again')


def test_a_sweep_that_fails_before_finishing_a_setting_leaves_nothing_behind(tmp_path):
    cfg = tmp_path / 'sweep_fails.py'
    cfg.write_text(SWEEP + f"init_from = {str(tmp_path / 'no_such_model')!r}\n")
    out = tmp_path / 'out'
    one_line_error(sweep_cli(str(cfg), f'--out_dir={out}'), 'no_such_model')
    assert not out.exists()


def test_a_run_of_other_seeds_or_settings_never_writes_over_a_finished_sweep(tmp_path):
    """A quick run (fewer seeds, fewer tokens) into a folder holding a sweep is refused and
    changes nothing; extend=True adds settings; replot redraws the plots from samples.jsonl
    alone (the published folders keep no per-setting files), compound only by default."""
    cfg = tmp_path / 'sweep_pub.py'
    cfg.write_text(SWEEP.replace('plots = False', 'plots = True') + "grid = {'mem_frac': [1.0]}\n")
    out = tmp_path / 'pub'
    assert sweep_cli(str(cfg), f'--out_dir={out}').returncode == 0
    files = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    one_line_error(sweep_cli(str(cfg), f'--out_dir={out}', '--seeds=1'), 'holds this sweep with 2 other seeds',
                   'use another out_dir')
    one_line_error(sweep_cli(str(cfg), f'--out_dir={out}', '--max_new_tokens=2'), 'holds a sweep of other settings')
    one_line_error(sweep_cli(str(cfg), f'--out_dir={out}', "--grid={'mem_frac': [1.0, 2.0]}"), '--extend=True')
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == files
    # a published folder: summaries, samples and plots, no per-setting files
    shutil.rmtree(out / 'settings')
    (out / 'results.csv').unlink()
    (out / 'vader.png').unlink()
    r = sweep_cli(str(cfg), f'--out_dir={out}', '--replot=True')
    assert r.returncode == 0, r.stderr
    assert (out / 'vader.png').read_bytes() == files[out / 'vader.png']  # the same figure, from samples.jsonl alone
    r = sweep_cli(str(cfg), f'--out_dir={out}', '--replot=True', "--vader_parts=['compound','pos']")
    assert r.returncode == 0 and (out / 'vader.png').read_bytes() != files[out / 'vader.png']
    one_line_error(sweep_cli(str(cfg), f'--out_dir={out}', "--vader_parts=['joy']"), "vader_parts=['joy']")
    # results without a sweep.json saying what they are are not written over either
    (out / 'sweep.json').unlink()
    one_line_error(sweep_cli(str(cfg), f'--out_dir={out}'), 'holds results (summary.csv) but no sweep.json')
    # extend: new settings beside the finished ones, which are not run again
    ext = tmp_path / 'ext'
    assert sweep_cli(str(cfg), f'--out_dir={ext}').returncode == 0
    r = sweep_cli(str(cfg), f'--out_dir={ext}', "--grid={'mem_frac': [1.0, 2.0]}", '--extend=True')
    assert r.returncode == 0 and '2 already finished, 1 to run' in r.stderr, r.stderr
    # replace: start the folder again with other seeds; files a sweep does not write stay
    (ext / 'notes.txt').write_text('mine')
    r = sweep_cli(str(cfg), f'--out_dir={ext}', '--seeds=1', '--replace=True')
    assert r.returncode == 0 and '0 already finished, 2 to run' in r.stderr, r.stderr
    assert len(list((ext / 'settings').glob('*.json'))) == 2 and (ext / 'notes.txt').read_text() == 'mine'
