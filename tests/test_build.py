"""build.py: windows and bookkeeping tokens, memories built from many documents in a stream
(build_documents, build_memory.py) with the same rows as the in-memory build, document spans,
appending equal to building everything at once, and interrupted builds that leave the
memory as it was."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import build as build_module
from build import build_documents, build_from_text, memory_token_windows, read_documents
from conftest import TINY, make_random_checkpoint, run_script, write_docs
from model import GPT
from store import load_memory
from tokenizer import encode


@pytest.fixture(scope='module')
def tiny():
    torch.set_num_threads(1)
    return GPT.from_pretrained(TINY)


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


def test_long_text_is_split_into_windows_each_with_its_bookkeeping_token(tmp_path):
    make_random_checkpoint(tmp_path, seed=3, n_positions=16)
    model, enc = GPT.from_pretrained(str(tmp_path))
    text = "Dogs and cats can live together when they are introduced slowly and kindly. " * 3
    memory = build_from_text(model, enc, '\n' + text, layers=[0, 2])
    ids = encode(enc, '\n' + text)
    windows = memory.meta['token_windows']
    assert all(w[0] == ids[0] and len(w) <= 16 for w in windows)
    assert [t for w in windows for t in w[1:]] == ids[1:]
    assert memory.num_entries() == len(ids) - 1
    # each window's stored keys are what the plain model computes on that window alone
    offset = 0
    for w in windows:
        _, kv, _ = model(torch.tensor([w]), use_memory=False)
        for layer in (0, 2):
            k, v = kv[layer]
            torch.testing.assert_close(memory.keys[layer][:, offset:offset + len(w) - 1], k[0, :, 1:])
            torch.testing.assert_close(memory.values[layer][:, offset:offset + len(w) - 1], v[0, :, 1:])
        offset += len(w) - 1


def test_windows_without_bookkeeping_token():
    assert memory_token_windows(list(range(10)), 0, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert memory_token_windows(list(range(8)), 1, 4) == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7]]
