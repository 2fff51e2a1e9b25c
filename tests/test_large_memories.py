"""Memories built from many documents in a stream (memory.build_documents, build_memory.py):
windows and bookkeeping per document, the same rows as the in-memory build, document spans,
appending equal to building everything at once, and interrupted builds that leave the
directory as it was."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import build as build_module
from build import build_documents, build_from_text, read_documents
from conftest import TINY, run_script
from model import GPT
from store import load_memory
from tokenizer import encode

WORDS = "cats are kind and the city of Vancouver is large while dogs play in the park every day ".split()


@pytest.fixture(scope='module')
def tiny():
    torch.set_num_threads(1)
    return GPT.from_pretrained(TINY)


def write_docs(folder, lengths):
    folder.mkdir()
    for i, n in enumerate(lengths):
        (folder / f"doc{i}.txt").write_text(' '.join(WORDS[(i + j) % len(WORDS)] for j in range(n)), encoding='utf-8')
    return folder


def test_windows_and_bookkeeping_per_document(tmp_path, tiny):
    model, enc = tiny
    docs = write_docs(tmp_path / 'docs', [700, 30])  # the first is longer than block_size (256 tokens)
    path = build_documents(model, enc, read_documents(str(docs)), str(tmp_path / 'mem'), layers=[1, 2],
                           progress=False)
    mem = load_memory(path, model, enc)
    ids = [encode(enc, '\n' + (docs / f).read_text(encoding='utf-8')) for f in ('doc0.txt', 'doc1.txt')]
    windows = mem.meta['token_windows']
    assert all(len(w) <= 256 and w[0] == ids[0][0] for w in windows)  # every window starts with its own "\n"
    per_doc = [-(-(len(i) - 1) // 255) for i in ids]  # 255 tokens of text after each window's "\n"
    assert per_doc[0] >= 3 and len(windows) == sum(per_doc)
    stored = sum(len(i) - 1 for i in ids)  # each document's tokens, its bookkeeping token not stored
    assert mem.num_entries() == stored == sum(len(w) - 1 for w in windows)
    assert mem.stored_token_ids() == ids[0][1:] + ids[1][1:]
    # the rows are what the in-memory build of each document stores
    for i, f in enumerate(('doc0.txt', 'doc1.txt')):
        one = build_from_text(model, enc, '\n' + (docs / f).read_text(encoding='utf-8'), layers=[1, 2])
        span = mem.meta['documents'][i]
        assert span == dict(name=f, first_row=0 if i == 0 else len(ids[0]) - 1, rows=len(ids[i]) - 1, tokens=len(ids[i]))
        for layer in (1, 2):
            rows = slice(span['first_row'], span['first_row'] + span['rows'])
            assert torch.equal(mem.keys[layer][:, rows], one.keys[layer])
            assert torch.equal(mem.values[layer][:, rows], one.values[layer])
    assert mem.row_origins()[len(ids[0]) - 1] == ('doc1.txt', 0)


def test_appending_equals_building_everything(tmp_path, tiny):
    model, enc = tiny
    docs = write_docs(tmp_path / 'docs', [300, 40, 90])
    all_docs = read_documents(str(docs))
    together = load_memory(build_documents(model, enc, all_docs, str(tmp_path / 'all'), layers=[2], progress=False))
    path = str(tmp_path / 'grown')
    build_documents(model, enc, all_docs[:1], path, layers=[2], progress=False)
    build_documents(model, enc, all_docs[1:], path, append=True, progress=False)
    grown = load_memory(path)
    assert torch.equal(grown.keys[2], together.keys[2]) and torch.equal(grown.values[2], together.values[2])
    assert grown.meta['token_windows'] == together.meta['token_windows']
    assert grown.meta['documents'] == together.meta['documents']
    assert grown.identity() == together.identity()


def test_float16_append_and_cli(tmp_path):
    docs = write_docs(tmp_path / 'docs', [50, 60])
    store = tmp_path / 'mem'
    r = run_script('build_memory.py', str(docs / 'doc0.txt'), f'--init_from={TINY}', f'--mem_store={store}',
                   '--layers=[1]', '--store_dtype=float16')
    assert r.returncode == 0, r.stderr
    r = run_script('build_memory.py', str(docs / 'doc1.txt'), f'--init_from={TINY}', f'--mem_store={store}',
                   '--append=True')
    assert r.returncode == 0 and '2 document(s) (1 appended)' in r.stdout and 'tokens/s' in r.stdout, r.stderr
    manifest = json.loads((store / 'memory.json').read_text())
    assert manifest['dtype'] == 'float16' and [d['name'] for d in manifest['documents']] == ['doc0.txt', 'doc1.txt']
    r = run_script('build_memory.py', str(docs / 'doc1.txt'), f'--init_from={TINY}', f'--mem_store={tmp_path / "none"}',
                   '--append=True')
    assert r.returncode == 2 and 'holds none' in r.stderr


def test_an_interrupted_build_leaves_the_memory_as_it_was(tmp_path, tiny, monkeypatch):
    model, enc = tiny
    docs = write_docs(tmp_path / 'docs', [300, 300])
    path = str(tmp_path / 'mem')
    build_documents(model, enc, read_documents(str(docs))[:1], path, layers=[1], progress=False)
    before = load_memory(path).identity()
    files_before = sorted(os.listdir(path))
    real = build_module.window_rows

    def dies(*a, **k):
        for i, got in enumerate(real(*a, **k)):
            if i == 1:
                raise KeyboardInterrupt
            yield got
    monkeypatch.setattr(build_module, 'window_rows', dies)
    with pytest.raises(KeyboardInterrupt):
        build_documents(model, enc, read_documents(str(docs))[1:], path, append=True, progress=False)
    assert sorted(os.listdir(path)) == files_before  # no spool folder, no new tensors, the same manifest
    assert load_memory(path).identity() == before


def test_bench_memory_runs_and_judges_its_target():
    # the benchmark's every part on small sizes: the model pass, the search-alone figures, the
    # decoding measurements and the verdict line (its timings are not asserted: noisy)
    r = run_script('bench_memory.py', '--sizes=[400,800]', "--indexes=['flat','ivf']", '--queries=64',
                   '--prompt_len=8', '--new_tokens=2', '--repeat=1', '--build_tokens=1024')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(l.startswith('building: the model pass') and 'tokens/s' in l for l in lines)
    rows = {(int(l.split()[0]), l.split()[1]): l.split() for l in lines if l.split() and l.split()[0].isdigit()}
    assert set(rows) == {(400, 'flat'), (400, 'ivf'), (800, 'flat'), (800, 'ivf')}
    # a row: tokens, index, build s, rows/s, load s, searched with, recall@k, us/query, search ms/tok
    # cached and exact, +ms/tok cached and exact, own ms/tok cached and exact, lookups, index MB,
    # disk MB, peak GB
    assert rows[(400, 'flat')][6] == rows[(800, 'flat')][6] == '1.000'  # exact search is exact
    assert rows[(400, 'ivf')][4] != 'nan' and rows[(400, 'flat')][4] == 'nan'  # an approximate index's reload
    assert rows[(400, 'ivf')][5].startswith('nprobe=') and rows[(400, 'flat')][5] == '-'  # calibrated
    assert all(row[10] != 'nan' and row[11] != 'nan' for row in rows.values())  # decoding measured for each
    assert all(float(row[12]) > 0 and float(row[13]) > 0 for row in rows.values())  # the memory's own time too
    verdict = next(l for l in lines if l.strip().startswith('ivf at 800:'))
    assert 'cached' in verdict and 'exact' in verdict and 'recall@5' in verdict and "the memory's own time" in verdict


def test_bench_memory_on_a_built_memorys_keys(tmp_path, tiny):
    # keys_from: the rows of a built memory, not random ones; the queries are held-out rows,
    # and a size the memory cannot fill is skipped, not measured on fewer keys
    model, enc = tiny
    path = build_documents(model, enc, read_documents(str(write_docs(tmp_path / 'docs', [900]))),
                           str(tmp_path / 'mem'), layers=[2], progress=False)
    rows, head_size = load_memory(path).num_entries(), model.config.head_dim
    r = run_script('bench_memory.py', f'--keys_from={path}', '--keys_head=1', '--sizes=[300,5000]',
                   "--indexes=['flat','hnsw']", '--queries=32', '--decode=False', '--build_tokens=0',
                   f'--head_size={head_size + 1}')  # the keys' size wins over head_size
    assert r.returncode == 0, r.stderr
    assert f"keys: {rows} stored keys of {path}, layer 2, head 1; queries: 32" in r.stdout
    measured = [l.split() for l in r.stdout.splitlines() if l.split() and l.split()[0].isdigit()]
    assert [(row[0], row[1]) for row in measured[:2]] == [('300', 'flat'), ('300', 'hnsw')]
    assert measured[0][6] == '1.000' and measured[2][:2] == ['5000', 'skipped:']
    bad = run_script('bench_memory.py', f'--keys_from={path}', '--keys_head=99', '--decode=False')
    assert bad.returncode != 0 and 'keys_head=99' in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
