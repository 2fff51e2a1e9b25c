"""Files from elsewhere, table by table: saved index files that do not belong to the keys
beside them (never searched: a warning and a rebuild), calibration claims that are false or
malformed, appends whose settings differ from the memory's, outputs aimed into a memory
directory, FAISS factory strings FAISS cannot run, and two appends at once."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save

from conftest import ROOT, TINY, TINY_ARG, one_line_error, run_script
from knn_index import KNNIndex
from memory import RetrievalSettings
from model import GPT
from store import load_memory

SETTINGS = RetrievalSettings([0, 5, 5, 0], 0.0, 0.0, 1.0, False, 0.0)


@pytest.fixture(scope='module')
def ivf_memory(tmp_path_factory):
    """A memory of layers 1 and 2 with saved IVF indexes (a pristine copy: each case copies it)."""
    store = tmp_path_factory.mktemp('hostile') / 'mem'
    text = open(os.path.join(ROOT, 'data', 'vancouver.txt'), encoding='utf-8').read() * 2
    (store.parent / 'text.txt').write_text(text, encoding='utf-8')
    r = run_script('build_memory.py', str(store.parent / 'text.txt'), TINY_ARG, f'--mem_store={store}',
                   '--layers=[1,2]', '--knn_index=ivf')
    assert r.returncode == 0 and 'trained and saved' in r.stdout, r.stderr
    return store


def index_file(store, layer):
    return next(store / f for f in os.listdir(store) if f.startswith('index-') and f.split('-')[2] == str(layer))


def read_index(path):
    with safe_open(str(path), 'np') as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def write_index(store, path, heads, meta, record=True):
    """Put an index file in place; record=True also puts its checksum in the manifest, as an
    attacker who can edit the manifest would."""
    data = save(heads, meta)
    path.write_bytes(data)
    if record:
        manifest = json.loads((store / 'memory.json').read_text())
        manifest.setdefault('indexes', {})[path.name] = hashlib.sha256(data).hexdigest()
        (store / 'memory.json').write_text(json.dumps(manifest))


def swap_layers(store, record):
    one, two = index_file(store, 1), index_file(store, 2)
    heads, meta = read_index(one)
    write_index(store, two, heads, meta, record)


def other_keys(store, how):
    """An index over other keys of the same shape: random ones, or the right ones with every
    id shifted by one row."""
    path = index_file(store, 2)
    _, meta = read_index(path)
    keys = load_memory(str(store)).keys[2].clone()
    keys = torch.randn_like(keys) * keys.std() if how == 'random' else keys.roll(1, dims=1)
    heads, calibration = KNNIndex(keys, 'faiss', 'ivf').serialized()
    write_index(store, path, heads, dict(meta, **calibration))


def flip_bytes(store):
    path = index_file(store, 2)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data), 7):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def calibration(store, value):
    path = index_file(store, 2)
    heads, meta = read_index(path)
    write_index(store, path, heads, dict(meta, calibration=value))


def unrecorded(store):
    manifest = json.loads((store / 'memory.json').read_text())
    del manifest['indexes']
    (store / 'memory.json').write_text(json.dumps(manifest))


CASES = {
    'layer 1 file in place of layer 2': (lambda s: swap_layers(s, False), 'does not match the checksum'),
    'layer 1 file in place of layer 2, manifest edited': (lambda s: swap_layers(s, True), 'was saved for other keys'),
    'an index over other keys of the same shape': (lambda s: other_keys(s, 'random'), 'not built over these keys'),
    'ids shifted by one row': (lambda s: other_keys(s, 'shifted'), 'not built over these keys'),
    'bytes flipped across half the file': (flip_bytes, 'does not match the checksum'),
    'calibration a string': (lambda s: calibration(s, '"fast"'), 'not one entry per head'),
    'calibration zero': (lambda s: calibration(s, '0'), 'not one entry per head'),
    'calibration nprobe 0': (lambda s: calibration(s, json.dumps([{'nprobe': 0, 'recall': 1.0}] * 4)), 'is not'),
    'calibration nprobe 1e300': (lambda s: calibration(s, json.dumps([{'nprobe': 1e300, 'recall': 1.0}] * 4)), 'is not'),
    'calibration recall negative': (lambda s: calibration(s, json.dumps([{'nprobe': 1, 'recall': -1}] * 4)), 'is not'),
    'calibration without its fields': (lambda s: calibration(s, json.dumps([{}] * 4)), 'is not'),
    'calibration not JSON': (lambda s: calibration(s, '[{'), 'not JSON'),
    'a file the manifest does not record': (unrecorded, 'does not record it'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_a_saved_index_that_does_not_belong_is_never_searched(ivf_memory, tmp_path, case):
    store = tmp_path / 'mem'
    shutil.copytree(ivf_memory, store)
    spoil, message = CASES[case]
    spoil(store)
    before = {f: (store / f).read_bytes() for f in os.listdir(store)}
    model, enc = GPT.from_pretrained(TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        layer = load_memory(str(store), model, enc).retrieving_layers(SETTINGS)[2]
    said = [str(w.message) for w in caught]
    assert said and all(message in m and 'building the index again' in m for m in said), said
    assert len(said) == (2 if case == 'a file the manifest does not record' else 1), said  # one per layer spoiled
    keys = layer.keys
    queries = keys[:, ::5].reshape(-1, keys.size(-1))
    heads = torch.arange(keys.size(0)).repeat_interleave(keys[:, ::5].size(1))
    fresh = KNNIndex(keys, 'faiss', 'ivf')
    assert torch.equal(layer.index.search(queries, heads, 5), fresh.search(queries, heads, 5))
    assert {f: (store / f).read_bytes() for f in os.listdir(store)} == before  # loading never writes


def test_a_false_calibration_claim_is_measured_and_replaced(ivf_memory, tmp_path):
    """A file claiming recall 0.99 at nprobe 1 over keys where nprobe 1 finds far less: the claim
    is measured on a sample, found false, and the head is calibrated again (and the record says so)."""
    torch.manual_seed(1)
    keys = torch.randn(2, 3000, 64)
    heads, _ = KNNIndex(keys, 'faiss', 'ivf').serialized()
    claim = json.dumps([{'nprobe': 1, 'recall': 0.99}] * 2)
    with pytest.warns(UserWarning, match=r'claims recall@10 0.990, a sample measures 0\.[0-7]'):
        index = KNNIndex(keys, 'faiss', 'ivf', saved=(heads, dict(calibration=claim)))
    assert all(f['nprobe'] > 1 and f['recall'] >= 0.95 for f in index.calibration)
    assert index.calibrated_now and 'recall@10 >= 0.9' in index.describe()


@pytest.fixture(scope='module')
def small_memory(tmp_path_factory):
    """A float16 memory of layer 2 with an HNSW index and a bookkeeping token of its own."""
    base = tmp_path_factory.mktemp('append')
    (base / 'a.txt').write_text('Cats are kind and the city is large.', encoding='utf-8')
    r = run_script('build_memory.py', str(base / 'a.txt'), TINY_ARG, f'--mem_store={base / "mem"}', '--layers=[2]',
                   '--store_dtype=float16', '--knn_index=hnsw', '--bookkeeping_token= ')
    assert r.returncode == 0, r.stderr
    return base


@pytest.mark.parametrize('option,named', [
    ('--layers=[1]', 'layers=[1]'), ('--layers=[1,2]', 'layers=[1, 2]'), ('--store_dtype=float32', "store_dtype='float32'"),
    ('--knn_index=flat', "knn_index='flat'"), ('--bookkeeping_token=\n', "bookkeeping_token='\\n'"),
    ('--memory_keys=rotated', "memory_keys='rotated'"), ('--remove_bookkeeping_token_mem_size=0', 'remove_bookkeeping_token_mem_size=0')])
def test_an_append_with_other_settings_than_the_memory_is_refused(small_memory, tmp_path, option, named):
    store = tmp_path / 'mem'
    shutil.copytree(small_memory / 'mem', store)
    before = {f: (store / f).read_bytes() for f in os.listdir(store)}
    (tmp_path / 'b.txt').write_text('Dogs play in the park every day.', encoding='utf-8')
    r = run_script('build_memory.py', str(tmp_path / 'b.txt'), TINY_ARG, f'--mem_store={store}', '--append=True', option)
    one_line_error(r, f'append=True: {named} differs from the memory', 'leave')
    assert {f: (store / f).read_bytes() for f in os.listdir(store)} == before
    # the memory's own settings, given or left out, append
    r = run_script('build_memory.py', str(tmp_path / 'b.txt'), TINY_ARG, f'--mem_store={store}', '--append=True',
                   '--layers=[2]', '--store_dtype=float16')
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('script,option', [('sample.py', '--out_jsonl={store}/memory.json'),
                                           ('sample.py', '--out_jsonl={store}/runs/samples.jsonl'),
                                           ('sweep.py', '--out_dir={store}'), ('logit_lens.py', '--out_dir={store}/lens'),
                                           ('retrieval_trace.py', '--out_dir={store}'),
                                           ('attention_maps.py', '--out_dir={store}/maps')])
def test_outputs_are_never_written_into_a_memory_directory(small_memory, tmp_path, script, option):
    store = tmp_path / 'mem'
    shutil.copytree(small_memory / 'mem', store)
    before = sorted(p.relative_to(store) for p in store.rglob('*'))
    r = run_script(script, TINY_ARG, '--knn_num=[0,0,5,0]', "--memory=\nCats.", '--max_new_tokens=1', '--seeds=[1]',
                   option.format(store=store))
    one_line_error(r, 'is inside the memory directory', str(store))
    assert sorted(p.relative_to(store) for p in store.rglob('*')) == before
    r = run_script('build_memory.py', str(small_memory / 'a.txt'), TINY_ARG, f'--mem_store={store}/inner')
    one_line_error(r, 'is inside the memory directory')


@pytest.mark.parametrize('factory', ['HNSW1', 'HNSW0', 'PQ16x0', 'NSG0', 'IDMap,Flat', 'IVF0,Flat', 'PCA0,Flat',
                                     'IVF4,PQ16x0', 'IVF4,PQ5', 'HNSW32,PQ4', 'LSH'])
def test_factory_strings_faiss_cannot_run_are_refused_before_faiss_sees_them(small_memory, tmp_path, factory):
    """Each of these crashed the process (segfault, abort, floating-point exception), hung, traced
    back or searched 1% of the neighbours; now a one-line error, in every entry point."""
    docs = small_memory / 'a.txt'
    one_line_error(run_script('build_memory.py', str(docs), TINY_ARG, f'--mem_store={tmp_path / "m"}',
                              f'--knn_index={factory}'), f'knn_index={factory!r}', 'factory strings taken')
    assert not (tmp_path / 'm').exists()
    one_line_error(run_script('sample.py', TINY_ARG, '--knn_num=[0,0,5,0]', "--memory=\nCats are kind.",
                              '--max_new_tokens=1', '--seeds=[1]', f'--knn_index={factory}'), f'knn_index={factory!r}')
    one_line_error(run_script('build_memory.py', f'--reindex={small_memory / "mem"}', f'--knn_index={factory}'),
                   f'knn_index={factory!r}')


def test_two_appends_at_once_keep_both_documents(small_memory, tmp_path):
    """The lock covers an append's read, build and commit: run together, one waits for the
    other, and the memory ends with both documents' rows (before, one was lost)."""
    store = tmp_path / 'mem'
    shutil.copytree(small_memory / 'mem', store)
    for name in ('b', 'c'):
        (tmp_path / f'{name}.txt').write_text(f'Document {name}: dogs play in the park every day.', encoding='utf-8')
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'build_memory.py'), str(tmp_path / f'{n}.txt'),
                               TINY_ARG, f'--mem_store={store}', '--append=True'], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in ('b', 'c')]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    manifest = json.loads((store / 'memory.json').read_text())
    assert sorted(d['name'] for d in manifest['documents']) == ['a.txt', 'b.txt', 'c.txt']
    assert manifest['num_entries'] == sum(d['rows'] for d in manifest['documents'])
