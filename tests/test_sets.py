"""Sweeps over item and prompt sets (sets.py, set_report.py) on the tiny checkpoint: every item's
result is what a one-prompt run of that item gives, set_memory='all' is one memory of every
document, the intervals resample whole units, tuning reads dev and reports test, bad set files
are one-line errors; and the project's own sets are what docs/evaluation.md says they are."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import set_report
import sweep
from configurator import UserError, configure
from conftest import ROOT, TINY, one_line_error, run_script
from memory import RetrievalSettings
from run import MemorySource, answer_scores, continuations, load_model, prompt_ids
from scores import afinn_score, content_words, copy_rate
from sets import load_set

DOCS = [dict(id='glass', split='dev', text="The glass festival is held in Orlevik every spring.",
             questions=[dict(question="\nThe glass festival is held in", answers=["Orlevik"])]),
        dict(id='lamp', split='test', text="The keeper of the Marrow lighthouse is Tessaly Brune.",
             questions=[dict(question="\nThe keeper of the Marrow lighthouse is", answers=["Tessaly Brune", "Tessaly"]),
                        dict(question="\nTessaly Brune keeps the", answers=["Marrow lighthouse"])]),
        dict(id='river', split='test', text="The Quillan river freezes in March.",
             questions=[dict(question="\nThe Quillan river freezes in", answers=["March"])])]
PROMPTS = [dict(id='p1', split='dev', prompt="\nThe food was"), dict(id='p2', split='test', prompt="\nMy neighbour is"),
           dict(id='p3', split='test', prompt="\nThe weather today")]
TYPE2 = dict(mem_frac=0.0, bookkeeping_frac=0.03, knn_softmax_influence=1000.0, resid_only=True, resid_frac=0.1)


def write_set(path, **data):
    path.write_text(json.dumps(data), encoding='utf-8')
    return str(path)


def answer_config(tmp_path, extra=''):
    items = write_set(tmp_path / 'items.json', format='recall-set', documents=DOCS)
    cfg = tmp_path / 'sweep_items.py'
    cfg.write_text(f"init_from = {TINY!r}\nitem_set = {items!r}\nmetric = 'answer'\nknn_num = [0, 0, 5, 0]\n"
                   + ''.join(f"{k} = {v!r}\n" for k, v in TYPE2.items())
                   + "baselines = ['plain', 'context']\n"
                   f"grid = {{'knn_num': [[0, 0, 5, 0], [5, 5, 5, 5]]}}\nout_dir = {str(tmp_path / 'out')!r}\n" + extra)
    return str(cfg)


def read_items(out):
    with open(os.path.join(out, 'items.csv'), encoding='utf-8') as f:
        return list(csv.DictReader(f))


def test_every_items_answer_score_is_what_a_run_of_that_item_alone_gives(tmp_path):
    cfg = answer_config(tmp_path)
    r = run_script('sweep.py', cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_items(str(tmp_path / 'out'))
    assert len(rows) == 4 * 3 + 0 * 1 + 4  # 4 grid points (plain, context, 2 memories) x 4 questions
    model, enc = load_model(dict(device='cpu', dtype='float32', init_from=TINY))
    config = configure(sweep.DEFAULTS, [cfg])
    for row in rows:
        doc = next(d for d in DOCS if d['id'] == row['unit'])
        q = doc['questions'][int(row['item'].split('/')[1])]
        text = "\n" + doc['text']
        start, ids = prompt_ids(q['question'], enc)
        retrieval = None
        if row['method'] == 'context':
            start, ids = text + q['question'], prompt_ids(text + q['question'], enc)[1]
        if row['method'] == 'memory':
            knn = [0, 0, 5, 0] if row['label'] == 'layer 2 k5' else [5, 5, 5, 5]
            settings = RetrievalSettings.from_config(dict(config, knn_num=knn))
            memory = MemorySource.from_config(dict(config, memory=text)).load(model, enc, settings.layers)
            retrieval = memory.retrieving_layers(settings, 'cpu')
        with torch.no_grad():
            want = answer_scores(model, enc, start, ids, q['answers'], 'exact', retrieval)
        assert float(row['answer_prob']) == pytest.approx(want['answer_prob'], rel=1e-9, abs=1e-300), row
    # the memory changes the answers' probability (else the comparison above proves little)
    probs = {(r['label'], r['item']): float(r['answer_prob']) for r in rows}
    assert any(probs[('layers 0,1,2,3 k5', i)] != probs[('plain', i)] for i in ('glass/0', 'lamp/0'))
    # a rerun runs nothing again; summary.txt tunes on dev and reports test
    again = run_script('sweep.py', cfg)
    assert again.returncode == 0 and '16 already finished, 0 to run' in again.stderr
    text = (tmp_path / 'out' / 'summary.txt').read_text(encoding='utf-8')
    assert 'dev split' in text and 'test split' in text and 'tuned on the dev split' in text
    assert (tmp_path / 'out' / 'set.png').stat().st_size > 10_000


def test_set_memory_all_is_one_memory_of_every_document(tmp_path):
    cfg = answer_config(tmp_path, "set_memory = 'all'\nsplit = 'test'\n")
    config = configure(sweep.DEFAULTS, [cfg])
    settings, _ = sweep.expand(config)
    whole = "\n" + "\n".join(d['text'] for d in DOCS)
    memories = {s['memory'].text for s in settings if s['method'] == 'memory'}
    assert memories == {whole}
    assert {s['context'] for s in settings if s['method'] == 'context'} == {whole}
    assert {s['item'] for s in settings} == {'lamp/0', 'lamp/1', 'river/0'}  # split='test' only
    first = configure(sweep.DEFAULTS, [cfg, '--split=both', '--max_items=1'])
    assert [s['item'] for s in sweep.expand(first)[0] if s['method'] == 'plain'] == ['glass/0', 'lamp/0']
    own = configure(sweep.DEFAULTS, [answer_config(tmp_path)])
    assert {s['memory'].text for s in sweep.expand(own)[0] if s['method'] == 'memory'} == \
        {"\n" + d['text'] for d in DOCS}


def test_a_prompt_set_sweep_runs_each_prompt_as_its_own_sweep_would(tmp_path):
    prompts = write_set(tmp_path / 'prompts.json', format='prompt-set', prompts=PROMPTS)
    memory = "\nA lovely, kind and wonderful day full of joy."
    cfg = tmp_path / 'sweep_prompts.py'
    cfg.write_text(f"init_from = {TINY!r}\nitem_set = {prompts!r}\nmetric = 'vader'\nmemory = {memory!r}\n"
                   "knn_num = [0, 3, 3, 0]\nmem_frac = 5.0\nbookkeeping_frac = 0.1\nknn_softmax_influence = 0.01\n"
                   f"resid_frac = 0.33\nseeds = 2\nmax_new_tokens = 6\nbaselines = ['plain']\nout_dir = {str(tmp_path / 'o')!r}\n")
    r = run_script('sweep.py', str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    samples = [json.loads(l) for l in (tmp_path / 'o' / 'samples.jsonl').read_text(encoding='utf-8').splitlines()]
    assert len(samples) == 2 * 3 * 2  # plain and memory x 3 prompts x 2 seeds
    config = configure(sweep.DEFAULTS, [str(cfg)])
    model, enc = load_model(config)
    settings = RetrievalSettings.from_config(config)
    retrieval = MemorySource.from_config(config).load(model, enc, settings.layers).retrieving_layers(settings, 'cpu')
    s0 = next(s for s in sweep.expand(config)[0] if s['method'] == 'memory')
    for p in PROMPTS:
        ids = prompt_ids(p['prompt'], enc)[1]
        want = continuations(model, ids, [1337, 1338], s0['sampling'], retrieval)
        got = [s['tokens'] for s in samples if s['method'] == 'memory' and s['prompt'] == p['prompt']]
        assert got == want
    for s in samples:
        assert {'afinn', 'copy_rate', 'compound'} <= set(s['scores'])
        assert s['scores']['afinn'] == afinn_score(s['text'])


def test_bootstrap_resamples_whole_units():
    # two units of two items: a resample's mean is 0, 1/2 or 1, so the interval is [0, 1]
    mean, lo, hi = set_report.bootstrap([0, 0, 1, 1], ['a', 'a', 'b', 'b'])
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    # eight items in two units: still [0, 1]; the same items each its own unit: narrower
    assert set_report.bootstrap([0] * 4 + [1] * 4, list('aaaabbbb'))[1:] == (0.0, 1.0)
    _, lo8, hi8 = set_report.bootstrap([0] * 4 + [1] * 4, list('abcdefgh'))
    assert 0 < lo8 < 0.5 < hi8 < 1
    assert set_report.bootstrap([0.3] * 5, list('abcde')) == pytest.approx((0.3, 0.3, 0.3))
    assert np.isnan(set_report.bootstrap([float('nan')], ['a'])[0])


def test_tuning_reads_the_dev_split_and_reports_the_test_split():
    rows = []
    for group, method, dev, test in (('p', 'plain', 0.1, 0.1), ('m1', 'memory', 0.5, 0.2), ('m2', 'memory', 0.4, 0.9)):
        for split, v in (('dev', dev), ('test', test)):
            rows += [dict(group=group, label=group, method=method, item=f"{split}{i}", split=split, unit=f"{split}{i}", kind='',
                          answer_prob=v, answer_top1=0.0, answer_logprob=np.log(v)) for i in range(3)]
    summary = set_report.set_summary('answer', rows)
    config = dict(memory_mode='values', set_memory='item', item_set='x', metric='answer')
    settings = [dict(group=g, method=m, config=config, copy_source='') for g, m in (('p', 'plain'), ('m1', 'memory'),
                                                                                     ('m2', 'memory'))]
    best = {fam: (dev['group'], test['group'], test['answer_prob']) for fam, dev, test in
            set_report.tuned('answer', summary, settings)}
    assert best['memory (values)'] == ('m1', 'm1', pytest.approx(0.2))  # not m2, the best on test
    m1_test = next(r for r in summary if r['group'] == 'm1' and r['split'] == 'test')
    assert m1_test['vs_plain'] == pytest.approx(0.1)


def test_copy_rate_counts_content_words_of_the_memory():
    memory = set(content_words("The cats are kind and gentle."))
    assert memory == {'cats', 'kind', 'gentle'}
    assert copy_rate("Cats are kind to dogs", memory) == pytest.approx(2 / 3)  # cats, kind of cats, kind, dogs
    assert np.isnan(copy_rate("and the of", memory))
    assert afinn_score("This is wonderful") > 0 > afinn_score("This is horrible")


@pytest.mark.parametrize('data, fragment', [
    ('not json', 'is not a JSON file'),
    (dict(format='recall-set', documents=[]), "'documents' must be a non-empty list"),
    (dict(format='other'), "'format' must be one of"),
    (dict(format='recall-set', documents=[dict(DOCS[0], split='train')]), "split='train' must be one of"),
    (dict(format='recall-set', documents=[dict(DOCS[0], questions=[dict(question='x', answers=[])])]),
     "'answers' must be a non-empty list"),
    (dict(format='recall-set', documents=[dict(DOCS[0], text='')]), "'text' must be a non-empty string"),
    (dict(format='prompt-set', prompts=[PROMPTS[0], PROMPTS[0]]), "the id 'p1' is used twice"),
])
def test_bad_set_files_are_one_line_errors(tmp_path, data, fragment):
    path = tmp_path / 'bad.json'
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding='utf-8')
    with pytest.raises(UserError, match=fragment.replace('(', r'\(').replace('[', r'\[')):
        load_set(str(path))
    cfg = answer_config(tmp_path, f"item_set = {str(path)!r}\n")
    one_line_error(run_script('sweep.py', cfg), fragment)


def test_a_set_of_the_wrong_kind_for_the_metric_is_refused(tmp_path):
    cfg = answer_config(tmp_path, "metric = 'vader'\n")
    one_line_error(run_script('sweep.py', cfg), "is a recall-set; metric='vader' needs a prompt-set")
    one_line_error(run_script('sweep.py', answer_config(tmp_path), '--set_memory=every'), "set_memory='every'")


def test_the_projects_sets_are_as_documented():
    items = load_set(os.path.join(ROOT, 'data', 'recall_items.json'))
    docs = {i.unit for i in items.items}
    dev_docs = {i.unit for i in items.of_split('dev')}
    assert len(docs) == 60 and len(items.items) == 120 and len(dev_docs) == 20
    assert all(1 <= sum(i.unit == d for i in items.items) <= 3 for d in docs)
    assert all(i.prompt.startswith('\n') for i in items.items)
    # every answer is in its own document: the memory holds what is asked
    assert all(any(a in i.document for a in i.answers) for i in items.items)
    prompts = load_set(os.path.join(ROOT, 'data', 'sentiment_prompts.json'))
    assert len(prompts.items) == 100 and len(prompts.of_split('dev')) == 34
    assert len({i.prompt for i in prompts.items}) == 100


def test_a_passkey_set_states_each_key_once_at_its_depth(tmp_path):
    path = write_set(tmp_path / 'pk.json', format='passkey-set', filler="The sky is blue.", sizes=[4, 10],
                     depths=[0, 0.5, 1], keys=2, seed=3, question="\nThe pass key is")
    items = load_set(path)
    assert items.kind == 'recall-set' and len(items.items) == 2 * 2 * 3
    for i in items.items:
        key = i.answers[0]
        assert len(key) == 5 and key.isdigit() and i.document.count(key) == 2  # "The pass key is K. ... K is the pass key."
        n, depth = int(i.kind.split()[0]), float(i.id.rsplit('-d', 1)[1])
        assert i.document.count("The sky is blue.") == n
        assert i.document.split("The pass key")[0].count("The sky is blue.") == round(depth * n)
        assert i.split == ('dev' if i.id.startswith('key0') else 'test')
    assert len({i.answers for i in items.items}) == 2
    assert load_set(path).items == items.items  # the same keys every time
    bad = write_set(tmp_path / 'bad.json', format='passkey-set', filler="x", sizes=[0], depths=[0], keys=1,
                    question="q")
    with pytest.raises(UserError, match="'sizes' must be a list"):
        load_set(bad)


def test_sentiment_tuning_with_the_fluency_limit_skips_a_parroting_setting():
    rows = []
    for group, method, positive, ppl in (('p', 'plain', 0.5, 8.0), ('parrot', 'memory', 1.0, 100.0),
                                         ('steer', 'memory', 0.8, 12.0)):
        for split in ('dev', 'test'):
            rows += [dict(group=group, label=group, method=method, item=f"{split}{i}", split=split, unit=f"{split}{i}",
                          kind='', positive=positive, afinn_positive=positive, judges_agree=1.0, compound=0.0,
                          copy_rate=0.1, perplexity=ppl, distinct_2=0.9) for i in range(3)]
    summary = set_report.set_summary('vader', rows)
    config = dict(memory_mode='values', set_memory='item', item_set='x', metric='vader')
    settings = [dict(group=g, method=m, config=config, copy_source='m') for g, m in
                (('p', 'plain'), ('parrot', 'memory'), ('steer', 'memory'))]
    pick = lambda fluency: {f: d['group'] for f, d, _ in set_report.tuned('vader', summary, settings, fluency)}  # noqa: E731
    assert pick(False)['memory (values)'] == 'parrot' and pick(True)['memory (values)'] == 'steer'
