"""memory.py, the method: retrieval settings checked, the selection rules, update_values by hand,
FAISS and torch search agreeing, what a layer retrieved, k clipped to the memory's size."""
import json
import os

import pytest
import torch

from build import build_from_text
from configurator import UserError
from conftest import REF, TEXT, TINY_ARG, run_script
from knn_index import KNNIndex, SearchSettings
from memory import LayerMemory, RetrievalSettings
from store import load_memory


def test_retrieval_settings_are_checked(tiny):
    model, enc = tiny
    memory = build_from_text(model, enc, TEXT, layers=[1])
    with pytest.raises(UserError, match='knn_num has 3 entries, the model has 4 layers'):
        memory.retrieving_layers(RetrievalSettings([0, 1, 0]))
    with pytest.raises(UserError, match=r'knn_num\[1\]=-1'):
        RetrievalSettings([0, -1, 0, 0])
    for key in ('mem_frac', 'bookkeeping_frac', 'knn_softmax_influence'):
        with pytest.raises(UserError, match=f'{key}=-0.5 must be a number from 0 to'):
            RetrievalSettings([0, 1, 0, 0], **{key: -0.5})
    with pytest.raises(UserError, match='resid_frac=1.5 must be between 0 and 1'):
        RetrievalSettings([0, 1, 0, 0], resid_frac=1.5)
    with pytest.raises(UserError, match=r'asks for layers \[2\] but the memory holds layers \[1\]'):
        memory.retrieving_layers(RetrievalSettings([0, 1, 1, 0]))
    with pytest.raises(UserError, match=r"search='fiass' must be one of 'faiss', 'torch'"):
        memory.retrieving_layers(RetrievalSettings([0, 1, 0, 0]), 'cpu', SearchSettings(search='fiass'))


def test_selection_rules():
    """docs/method.md section 2 step 1 on a hand-made attention row."""
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
    """One selected token-head, worked through docs/method.md steps 2-6 by hand, both search kinds;
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
    plain = model(x)[0]
    logits = []
    for search in ('faiss', 'torch'):
        memory = build_from_text(model, enc, reference['memory_text'], layers=[0, 1, 2, 3])
        layers = memory.retrieving_layers(RetrievalSettings([2, 2, 2, 2], mem_frac=1.0), 'cpu', SearchSettings(search))
        model.attach_memory(layers)
        logits.append(model(x)[0])
        model.attach_memory(None)
        # the searches had something to agree on: token-heads were looked up in every layer
        assert all(lm.last_retrieval is not None and lm.last_retrieval.b.numel() > 0 for lm in layers.values())
    assert (logits[0] - plain).abs().max() > 1e-3  # and what they found changed the output
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


def test_a_huge_k_is_clipped_to_the_memory_size(reference):
    r = run_script('sample.py', TINY_ARG, '--knn_num=[0,1000000000000,0,0]', f'--memory={reference["memory_text"]}',
                   '--mem_frac=5.0', '--seeds=[1]', '--max_new_tokens=3', '--out_jsonl=/dev/stdout')
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])['tokens']) == 3
