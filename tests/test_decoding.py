"""Exact and cached decoding: the invariants of each."""
import pytest
import torch

from build import build_from_text
from decoding import Decoder, generate, sample_next
from memory import RetrievalSettings

SETTINGS = dict(knn_num=[0, 3, 3, 0], mem_frac=5.0, bookkeeping_frac=0.1, knn_softmax_influence=0.01, resid_frac=0.33)


@pytest.fixture
def memory(tiny, reference):
    """The retrieving layers of a memory at layers 1 and 2."""
    model, enc = tiny
    mem = build_from_text(model, enc, reference['memory_text'], layers=[1, 2])
    yield mem.retrieving_layers(RetrievalSettings(**SETTINGS))
    model.attach_memory(None)


def gen(model, x, seeds, n, mode, logits_out=None, forced=None):
    """Decode n tokens for each seed; logits_out receives each step's next-token logits (B, V);
    forced (B, n) feeds those tokens instead of sampling (teacher forcing)."""
    x = x.repeat(len(seeds), 1)
    if logits_out is None and forced is None:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return generate(model, x, n, 0.8, 200, generators=gens, mode=mode)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    decoder = Decoder(model, mode, capacity=x.size(1) + n)
    with torch.no_grad():
        logits = decoder.prefill(x)
        for step in range(n):
            if logits_out is not None:
                logits_out.append(logits.float())
            nxt = forced[:, step:step + 1] if forced is not None else sample_next(logits, 0.8, 200, gens)
            x = torch.cat((x, nxt), dim=1)
            if step < n - 1:
                logits = decoder.step(nxt)
    return x


def test_cached_without_memory_is_plain_decoding(tiny, reference):
    model, _ = tiny
    x = torch.tensor([reference['prompt_ids']])
    assert torch.equal(gen(model, x, [1, 2, 3], 20, 'cached'), gen(model, x, [1, 2, 3], 20, 'exact'))
    assert gen(model, x, [1337], 24, 'cached')[0, 10:].tolist() == reference['unadulterated']['1337']


def test_cached_equals_exact_on_the_first_token(tiny, reference, memory):
    model, _ = tiny
    model.attach_memory(memory)
    x = torch.tensor([reference['prompt_ids']])
    logits = {}
    for mode in ('exact', 'cached'):
        out = []
        y = gen(model, x, [1, 2, 3, 4], 5, mode, logits_out=out)
        logits[mode] = (y, out)
    torch.testing.assert_close(logits['exact'][1][0], logits['cached'][1][0])
    # a single pass in cached mode without a cache is an exact pass
    with torch.no_grad():
        torch.testing.assert_close(model(x, cached_memory=True)[0], model(x)[0])
    assert torch.equal(logits['exact'][0][:, :11], logits['cached'][0][:, :11])
    # and it is an approximation: later steps differ somewhere
    forced = logits['exact'][0][:, 10:]
    out_c = []
    gen(model, x, [1, 2, 3, 4], 5, 'cached', forced=forced, logits_out=out_c)
    assert max((a - b).abs().max().item() for a, b in zip(logits['exact'][1][1:], out_c[1:])) > 1e-4


def test_cached_computes_each_token_head_once(tiny, reference, memory, monkeypatch):
    model, _ = tiny
    model.attach_memory(memory)
    rows = []
    for lm in memory.values():
        original = lm.memory_values
        monkeypatch.setattr(lm, 'memory_values', lambda q, k, v, h, f=original: rows.append(q.size(0)) or f(q, k, v, h))
    x = torch.tensor([reference['prompt_ids']])
    cache = model.new_cache()
    with torch.no_grad():
        model(x.repeat(2, 1), cache=cache, cached_memory=True)
        for t in range(15):
            model(torch.full((2, 1), 7 + t), cache=cache, cached_memory=True)
    computed = sum(int(cache[l].memory_state(None, 25)[1].sum()) for l in memory)
    assert sum(rows) == computed > 0
    assert cache[1].length == 25


def test_exact_mode_rejects_a_cache_in_memory_layers(tiny, reference, memory):
    model, _ = tiny
    model.attach_memory(memory)
    x = torch.tensor([reference['prompt_ids']])
    cache = model.new_cache()
    model(x, use_memory=False, cache=cache)
    with pytest.raises(ValueError, match='cached_memory=True'):
        model(x[:, :1], cache=cache)


@pytest.mark.parametrize('knn_num', [[0, 3, 3, 0], [3, 0, 0, 0], [0, 0, 0, 3]])
def test_exact_generation_equals_naive_full_recompute(tiny, reference, knn_num):
    """Exact mode (KV cache below the first memory layer, that layer's q, k, v of past positions
    reused, the top layer on the last position only) draws what rerunning the whole model on
    the whole context each step draws, also once the context window slides."""
    model, enc = tiny
    memory = build_from_text(model, enc, reference['memory_text'], layers=[i for i, k in enumerate(knn_num) if k])
    model.attach_memory(memory.retrieving_layers(RetrievalSettings(**dict(SETTINGS, knn_num=knn_num))))
    try:
        x = torch.randint(0, 473, (2, 245), generator=torch.Generator().manual_seed(0))
        fast = gen(model, x[:1], [5, 6], 16, 'exact')  # crosses block_size 256
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        idx = x[:1].repeat(2, 1)
        with torch.no_grad():
            for _ in range(16):
                logits, _, _ = model(idx[:, -256:], all_logits=True)  # every layer on every position
                idx = torch.cat((idx, sample_next(logits[:, -1], 0.8, 200, gens)), 1)
    finally:
        model.attach_memory(None)
    assert torch.equal(fast, idx)
