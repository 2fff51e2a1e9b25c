"""Building, saving, loading and refusing memories; retrieval invariants."""
import json
import os

import pytest
import torch

from build import build_from_text, memory_token_windows
from configurator import UserError
from conftest import REF, make_random_checkpoint
from decoding import generate
from knn_index import KNNIndex, SearchSettings
from memory import LayerMemory, RetrievalSettings
from model import GPT
from store import load_memory, save_memory
from tokenizer import encode

TEXT = "\nCats are curious animals that sleep for most of the day and play at night."


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


def test_save_load_round_trip(tiny, tmp_path, reference):
    model, enc = tiny
    memory = build_from_text(model, enc, TEXT, layers=[1, 2])
    path = save_memory(memory, tmp_path / 'mem')
    manifest = json.load(open(os.path.join(path, 'memory.json')))
    assert manifest['format_version'] == 2 and manifest['layers'] == [1, 2]
    assert manifest['model']['fingerprint'] == model.fingerprint()
    assert manifest['token_windows'] == [encode(enc, TEXT)] and manifest['text'] == TEXT
    loaded = load_memory(path, model, enc)
    for l in (1, 2):
        assert torch.equal(loaded.keys[l], memory.keys[l]) and torch.equal(loaded.values[l], memory.values[l])
    x = torch.tensor([reference['prompt_ids']])
    outs = []
    for m in (memory, loaded):
        model.attach_memory(m.retrieving_layers(RetrievalSettings([0, 3, 3, 0], mem_frac=5.0, bookkeeping_frac=0.1,
                                                                  knn_softmax_influence=0.01, resid_frac=0.33)))
        torch.manual_seed(1)
        outs.append(generate(model, x, 10, 0.8, 200).tolist())
        model.attach_memory(None)
    assert outs[0] == outs[1]
    assert os.listdir(tmp_path) == ['mem']  # nothing left beside it


def test_interrupted_save_keeps_the_old_memory(tiny, tmp_path, monkeypatch):
    model, enc = tiny
    old = build_from_text(model, enc, TEXT, layers=[1])
    path = save_memory(old, tmp_path / 'mem')
    new = build_from_text(model, enc, TEXT + " More.", layers=[2])
    import safetensors.torch

    def crash(tensors, filename, *a, **k):
        with open(filename, 'wb') as f:
            f.write(b'half a file')
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, 'save_file', crash)
    with pytest.raises(KeyboardInterrupt):
        save_memory(new, path)
    assert os.listdir(tmp_path) == ['mem']
    assert load_memory(path, model, enc).stored_layers == [1]


def test_refuses_memory_of_another_model(tiny, tmp_path):
    model, enc = tiny
    make_random_checkpoint(tmp_path / 'other', seed=5, n_embd=64, n_layer=4, n_head=4, n_positions=256)
    other, _ = GPT.from_pretrained(str(tmp_path / 'other'))
    path = save_memory(build_from_text(other, enc, TEXT, layers=[1]), tmp_path / 'mem')
    with pytest.raises(UserError, match=r'memory was made by model other \(weights [0-9a-f]+\), not by tiny-gpt2'):
        load_memory(path, model, enc)
    make_random_checkpoint(tmp_path / 'small', seed=5)
    small, _ = GPT.from_pretrained(str(tmp_path / 'small'))
    path = save_memory(build_from_text(small, enc, TEXT, layers=[1]), tmp_path / 'mem2')
    with pytest.raises(UserError, match=r'n_layer=3 \(small\), this model has n_layer=4 \(tiny-gpt2\)'):
        load_memory(path, model, enc)


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'manifest', 'missing'])
def test_refuses_corrupted_memory(tiny, tmp_path, damage):
    model, enc = tiny
    path = save_memory(build_from_text(model, enc, TEXT, layers=[1]), tmp_path / 'mem')
    tensors = os.path.join(path, *json.load(open(os.path.join(path, 'memory.json')))['tensors'])
    if damage == 'truncate':
        data = open(tensors, 'rb').read()
        open(tensors, 'wb').write(data[:len(data) // 2])
    elif damage == 'flip':
        data = bytearray(open(tensors, 'rb').read())
        data[-5] ^= 0xFF
        open(tensors, 'wb').write(bytes(data))
    elif damage == 'manifest':
        open(os.path.join(path, 'memory.json'), 'w').write('{"format": "gpt2-persistent-mem')
    else:
        os.remove(tensors)
    with pytest.raises(UserError, match='rebuild'):
        load_memory(path, model, enc)


def test_refuses_legacy_memory_of_another_shape(tmp_path):
    make_random_checkpoint(tmp_path / 'm', seed=1, n_embd=32, n_head=4, n_layer=4)
    model, enc = GPT.from_pretrained(str(tmp_path / 'm'))
    with pytest.raises(UserError, match=r'expected \(N\+1, 8\)'):
        load_memory(os.path.join(REF, 'legacy-memstores', 'type2_recall_one_layer', 'memstore'), model, enc)


def test_retrieval_settings_are_checked(tiny):
    model, enc = tiny
    memory = build_from_text(model, enc, TEXT, layers=[1])
    with pytest.raises(UserError, match='knn_num has 3 entries, the model has 4 layers'):
        memory.retrieving_layers(RetrievalSettings([0, 1, 0]))
    with pytest.raises(UserError, match=r'knn_num\[1\]=-1'):
        RetrievalSettings([0, -1, 0, 0])
    for key in ('mem_frac', 'bookkeeping_frac', 'knn_softmax_influence'):
        with pytest.raises(UserError, match=f'{key}=-0.5 must be a number >= 0'):
            RetrievalSettings([0, 1, 0, 0], **{key: -0.5})
    with pytest.raises(UserError, match='resid_frac=1.5 must be between 0 and 1'):
        RetrievalSettings([0, 1, 0, 0], resid_frac=1.5)
    with pytest.raises(UserError, match=r'asks for layers \[2\] but the memory holds layers \[1\]'):
        memory.retrieving_layers(RetrievalSettings([0, 1, 1, 0]))
    with pytest.raises(UserError, match=r"search='fiass' must be one of 'faiss', 'torch'"):
        memory.retrieving_layers(RetrievalSettings([0, 1, 0, 0]), 'cpu', SearchSettings(search='fiass'))


def test_selection_rules():
    """METHOD.md section 2 step 1 on a hand-made attention row."""
    keys = torch.randn(1, 5, 4)
    att = torch.zeros(1, 1, 4, 4)
    att[0, 0, -1] = torch.tensor([0.5, 0.3, 0.15, 0.05])  # T = 4
    sel = lambda **kw: LayerMemory(keys, keys, None, 1, RetrievalSettings([1], **kw)).select(att)[0, 0].tolist()
    assert sel(mem_frac=0, bookkeeping_frac=0) == [True, False, False, False]   # MF 0: token 0 only
    assert sel(mem_frac=0, bookkeeping_frac=0.5) == [False, False, False, False]  # BF drops s0 <= BF
    assert sel(mem_frac=1, bookkeeping_frac=0) == [True, True, False, False]     # keep s >= 1/(MF*T) = 0.25
    assert sel(mem_frac=5, bookkeeping_frac=0.6) == [False, True, True, True]    # 1/20 = 0.05 kept (not <)


@pytest.mark.parametrize('search', ['faiss', 'torch'])
def test_update_values_by_hand(search):
    """One selected token-head, worked through METHOD.md steps 2-6 by hand, both search kinds;
    fewer stored entries than k: the missing neighbours take no part."""
    torch.manual_seed(0)
    d = 4
    mem_k, mem_v = torch.randn(1, 2, d), torch.randn(1, 2, d)
    q, k, v = torch.randn(1, 1, 3, d), torch.randn(1, 1, 3, d), torch.randn(1, 1, 3, d)
    att = torch.tensor([[[[1, 0, 0], [0.5, 0.5, 0], [0.9, 0.05, 0.05]]]])
    for resid_only, r in ((False, 0.0), (True, 0.1), (False, 0.33)):
        settings = RetrievalSettings([3], mem_frac=0, knn_softmax_influence=2.0, resid_only=resid_only, resid_frac=r)
        lm = LayerMemory(mem_k, mem_v, KNNIndex(mem_k, search), 3, settings)
        out = lm.update_values(q, k, v, att)
        cand_k = mem_k[0] if resid_only else torch.cat((k[0, 0, :1], mem_k[0]))
        cand_v = mem_v[0] if resid_only else torch.cat((v[0, 0, :1], mem_v[0]))
        w = torch.softmax(2.0 * (cand_k @ q[0, 0, 0]) / d ** 0.5, 0)
        m = w @ cand_v
        expected = (1 - r) * m + r * v[0, 0, 0] if r else m
        torch.testing.assert_close(out[0, 0, 0], expected)
        torch.testing.assert_close(out[0, 0, 1:], v[0, 0, 1:])  # unselected values untouched


def test_faiss_and_torch_search_agree(tiny, reference):
    model, enc = tiny
    x = torch.tensor([reference['prompt_ids']])
    logits = []
    for search in ('faiss', 'torch'):
        memory = build_from_text(model, enc, reference['memory_text'], layers=[0, 1, 2, 3])
        model.attach_memory(memory.retrieving_layers(RetrievalSettings([2, 2, 2, 2], mem_frac=1.0), 'cpu', SearchSettings(search)))
        logits.append(model(x)[0])
        model.attach_memory(None)
    torch.testing.assert_close(logits[0], logits[1])


def test_what_the_memory_retrieved_can_be_inspected(tiny, reference):
    model, enc = tiny
    memory = build_from_text(model, enc, reference['memory_text'], layers=[1])
    assert memory.stored_token_ids() == reference['memory_ids'][1:]
    legacy = load_memory(os.path.join(REF, 'legacy-memstores', 'type3_sentiment_two_layers', 'memstore'), model, enc)
    assert legacy.stored_token_ids() == reference['memory_ids'][1:]
    retrieval = memory.retrieving_layers(RetrievalSettings([0, 3, 0, 0], mem_frac=5.0))
    model.attach_memory(retrieval)
    try:
        _, kv, _ = model(torch.tensor([reference['prompt_ids']]))
    finally:
        model.attach_memory(None)
    lm = retrieval[1]
    r = lm.last_retrieval
    n = int(lm.last_selection.sum())
    assert n > 0 and r.neighbours.shape == (n, 3) and r.weights.shape == (n, 4)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(n))
    k = kv[1][0]
    for i in range(n):
        key = k[r.b[i], r.h[i], r.j[i]]
        dist = (memory.keys[1][r.h[i]] - key).pow(2).sum(-1)
        assert set(r.neighbours[i].tolist()) == set(dist.topk(3, largest=False).indices.tolist())
    # a call that selects nothing leaves no stale retrieval from the call before
    q = torch.randn(1, 4, 5, 16)
    lm.update_values(q, q, q, torch.zeros(1, 4, 5, 5))
    assert lm.last_retrieval is None and not lm.last_selection.any()
