"""Index choice per memory (docs/method.md section 2 step 2 with an approximate search): exact flat
search equals the torch search; HNSW and IVF find the exact neighbours on small data; the
choice is recorded in the manifest, used on load, overridden at sample time and changed by
re-indexing without the model; bad choices are one-line errors."""
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import knn_index
import sweep
from configurator import UserError
from conftest import TINY, run_script
from index_choice import REFINE_K_FACTOR, SEARCH_LADDERS, SEARCH_RECALL, index_factory, set_search_parameter
from knn_index import KNNIndex, SearchSettings
from memory import RetrievalSettings
from model import GPT
from store import load_memory, save_indexes


def recall_at_k(found, exact):
    return sum(len(set(f) & set(e)) for f, e in zip(found.tolist(), exact.tolist())) / exact.numel()


@pytest.fixture(scope='module')
def data():
    torch.manual_seed(0)
    # clustered keys, as a model's are: 40 centres, 2,000 keys per head, 2 heads
    centres = torch.randn(2, 40, 32) * 3
    keys = centres[:, torch.randint(0, 40, (2000,))] + torch.randn(2, 2000, 32)
    queries = keys[torch.tensor([0, 1] * 100), torch.randint(0, 2000, (200,))] + 0.3 * torch.randn(200, 32)
    heads = torch.tensor([0, 1] * 100)
    return keys, queries, heads


def test_exact_indexes_agree(data):
    keys, queries, heads = data
    flat = KNNIndex(keys, 'faiss', 'flat').search(queries, heads, 5)
    exact = KNNIndex(keys, 'torch').search(queries, heads, 5)
    assert recall_at_k(flat, exact) == 1.0


def per_head_search(keys, queries, heads, k):
    """The search a layer's is checked against: one FAISS IndexFlatL2 per head, each query alone."""
    import faiss
    found = torch.full((queries.size(0), k), -1, dtype=torch.long)
    for h in range(keys.size(0)):
        index = faiss.IndexFlatL2(keys.size(2))
        index.add(keys[h].numpy())
        for i in (heads == h).nonzero(as_tuple=True)[0].tolist():
            _, ids = index.search(queries[i:i + 1].numpy(), min(k, keys.size(1)))
            found[i, :ids.shape[1]] = torch.from_numpy(ids[0])
    return found


@pytest.mark.parametrize('kind', ['faiss', 'torch'])
@pytest.mark.parametrize('per_head', [[1, 0, 2, 1], [25, 3, 0, 40], [0, 0, 0, 0]])
def test_a_layer_search_equals_one_exact_search_per_head(kind, per_head):
    """KNNIndex.search sorts a layer's queries by head and searches each head's block at once (FAISS)
    or every head in one padded batch (torch): the neighbours are those of a search per head and
    query, in every order of heads, with heads that have no queries, counts on both sides of
    FAISS's 20-query switch to BLAS, and k beyond the stored keys."""
    gen = torch.Generator().manual_seed(sum(per_head))
    keys = torch.randn(4, 300, 16, generator=gen)
    heads = torch.cat([torch.full((c,), h) for h, c in enumerate(per_head)]).long()
    heads = heads[torch.randperm(heads.numel(), generator=gen)]
    queries = keys[heads, torch.randint(0, 300, heads.shape, generator=gen)] + 0.5 * torch.randn(heads.numel(), 16, generator=gen)
    index = KNNIndex(keys, kind)
    for k in (1, 7, 400):
        found, expected = index.search(queries, heads, k), per_head_search(keys, queries, heads, k)
        assert found.shape == (heads.numel(), k)
        if kind == 'faiss':
            assert torch.equal(found, expected)
        else:  # the same rows; torch's distances round differently, so the order of near ties may differ
            assert [sorted(r) for r in found.tolist()] == [sorted(r) for r in expected.tolist()]


def test_grouped_query_heads_search_their_key_value_heads_memory():
    """A GQA layer memory (4 query heads, 2 key/value heads): each selected token-head's neighbours
    are the exact neighbours of its own key in its key/value head's stored keys."""
    from memory import LayerMemory
    gen = torch.Generator().manual_seed(3)
    mem_k, mem_v = torch.randn(2, 50, 8, generator=gen), torch.randn(2, 50, 8, generator=gen)
    q, k, v = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    att = torch.softmax(torch.randn(1, 4, 6, 6, generator=gen), -1)
    settings = RetrievalSettings([3], mem_frac=3.0)
    for kind in ('faiss', 'torch'):
        lm = LayerMemory(mem_k, mem_v, KNNIndex(mem_k, kind), 3, settings)
        lm.update_values(q, k, v, att)
        r = lm.last_retrieval
        assert r.h.unique().numel() == 4  # every query head looked something up
        g = r.h // 2
        expected = per_head_search(mem_k, k[r.b, g, r.j], g, 3)
        assert [sorted(x) for x in r.neighbours.tolist()] == [sorted(x) for x in expected.tolist()]
        torch.testing.assert_close(r.distances, (mem_k[g[:, None], r.neighbours] - k[r.b, g, r.j][:, None]).pow(2).sum(-1))


@pytest.mark.parametrize('knn_index,params,at_least', [('hnsw', dict(efSearch=64), 0.95), ('ivf', dict(nprobe=8), 0.95),
                                                       ('ivf', dict(nprobe=1000), 1.0), ('IVF16,Flat', {}, 0.98),
                                                       pytest.param('ivfpq', dict(nprobe=8), 0.3, marks=pytest.mark.slow), ('hnsw', {}, 0.95),
                                                       ('ivf', {}, 0.95), ('ivfsq', {}, 0.9), ('ivfpqfs', {}, 0.95)])
def test_approximate_indexes_recall(data, knn_index, params, at_least):
    keys, queries, heads = data
    exact = KNNIndex(keys, 'torch').search(queries, heads, 5)
    found = KNNIndex(keys, 'faiss', knn_index, params).search(queries, heads, 5)
    assert recall_at_k(found, exact) >= at_least


def test_short_names_and_bad_choices(data):
    keys, _, _ = data
    assert index_factory('ivf', 2000, 32) == 'IVF51,Flat' and index_factory('ivf', 100, 32) == 'IVF2,Flat'
    assert index_factory('ivfpq', 100_000, 64) == 'IVF632,PQ16' and index_factory('', 5, 8) == 'Flat'
    assert index_factory('ivfsq', 100_000, 64) == 'IVF632,SQ8' and index_factory('ivf', 10 ** 6, 64) == 'IVF2000,Flat'
    assert index_factory('ivfpqfs', 10 ** 6, 64) == 'RR64,IVF2000,PQ64x4fs,RFlat'
    with pytest.raises(UserError, match="knn_index='IVFbad': not a form this code builds"):
        KNNIndex(keys, 'faiss', 'IVFbad')
    with pytest.raises(UserError, match='at least 39 keys per list'):
        KNNIndex(keys[:, :50], 'faiss', 'IVF64,Flat')
    with pytest.raises(UserError, match="search='torch' is exact"):
        KNNIndex(keys, 'torch', 'hnsw')
    with pytest.raises(UserError, match='nprobe and ef_search'):
        KNNIndex(keys, 'faiss', 'ivf', dict(nprobe=0))
    with pytest.raises(UserError, match="nprobe=4: the 'HNSW32' index has no nprobe"):
        KNNIndex(keys, 'faiss', 'hnsw', dict(nprobe=4))


def leave_one_out_recall(index, keys, k=10):
    """Recall@k of a FAISS index searching for each stored key's k nearest other keys, by our
    own count (exact neighbours from torch), over every stored key."""
    x = keys.float()
    dist = torch.cdist(x, x).fill_diagonal_(float('inf'))
    exact = dist.topk(k, largest=False).indices
    _, found = index.search(x.numpy(), k + 1)  # k + 1: the key itself is among them
    return recall_at_k(found, exact)


@pytest.fixture(scope='module')
def hard_keys():
    # keys without tight clusters, where the number of lists an IVF index visits matters
    torch.manual_seed(1)
    return torch.randn(2, 3000, 64)


@pytest.mark.parametrize('knn_index,parameter', [('ivf', 'nprobe'), ('hnsw', 'efSearch')])
def test_calibration_chooses_the_smallest_search_parameter_that_finds_the_neighbours(hard_keys, knn_index, parameter):
    index = KNNIndex(hard_keys, 'faiss', knn_index)
    ladder = SEARCH_LADDERS[parameter]
    for h, found in enumerate(index.calibration):
        chosen = found[parameter]
        assert found['recall'] >= SEARCH_RECALL and chosen > ladder[0]  # FAISS's own default would not do here
        faiss_index = index.heads[h]
        assert getattr(faiss_index if parameter == 'nprobe' else faiss_index.hnsw, parameter) == chosen
        at_chosen = leave_one_out_recall(faiss_index, hard_keys[h])
        set_search_parameter(faiss_index, parameter, ladder[ladder.index(chosen) - 1], '')
        below = leave_one_out_recall(faiss_index, hard_keys[h])
        # measured on all keys, not the calibration's sample: it finds what the sample found
        assert at_chosen >= SEARCH_RECALL - 0.01 and below < at_chosen and below < SEARCH_RECALL + 0.005


def test_a_given_search_parameter_wins_and_a_saved_calibration_is_reused(hard_keys, monkeypatch):
    given = KNNIndex(hard_keys, 'faiss', 'ivf', dict(nprobe=3))
    assert given.calibration is None and [h.nprobe for h in given.heads] == [3, 3]
    built = KNNIndex(hard_keys, 'faiss', 'ivf')
    saved = built.serialized()
    assert json.loads(saved[1]['calibration']) == built.calibration

    def no_calibration(*args):
        raise AssertionError('calibrated again')
    monkeypatch.setattr(knn_index, 'calibrate', no_calibration)
    loaded = KNNIndex(hard_keys, 'faiss', 'ivf', saved=saved)
    assert loaded.calibration == built.calibration
    assert [h.nprobe for h in loaded.heads] == [f['nprobe'] for f in built.calibration]
    assert 'nprobe' in loaded.describe() and 'calibrated: recall@10 >=' in loaded.describe()
    with pytest.raises(ValueError, match='not one entry per head'):
        KNNIndex(hard_keys, 'faiss', 'ivf', saved=(saved[0], dict(calibration='[{"nprobe": 2}]')))


def test_an_ivf_with_an_hnsw_quantizer_is_calibrated_saved_and_read_back(data):
    # IVF<lists>_HNSW<M>: the lists found through a graph over the centroids; nprobe is what is
    # calibrated (not the graph's efSearch), and the saved index finds the same rows
    keys, queries, heads = data
    built = KNNIndex(keys, 'faiss', 'IVF32_HNSW8,Flat')
    assert all(set(f) == {'nprobe', 'recall'} and f['recall'] >= SEARCH_RECALL for f in built.calibration)
    exact = KNNIndex(keys, 'torch').search(queries, heads, 5)
    found = built.search(queries, heads, 5)
    assert recall_at_k(found, exact) >= 0.95
    loaded = KNNIndex(keys, 'faiss', 'IVF32_HNSW8,Flat', saved=built.serialized())
    assert loaded.calibration == built.calibration and torch.equal(loaded.search(queries, heads, 5), found)
    with pytest.raises(UserError, match="HNSW's M .* must be 4 to 256, not 2"):
        KNNIndex(keys, 'faiss', 'IVF32_HNSW2,Flat')


def test_fast_scan_pq_reranked_exactly_is_calibrated_saved_and_read_back(data):
    # 'ivfpqfs': 4-bit fast-scan codes choose REFINE_K_FACTOR x k candidates, ranked again by exact
    # distance: the distances returned are the true ones, and the factor is saved with the index
    keys, queries, heads = data
    built = KNNIndex(keys, 'faiss', 'ivfpqfs')
    assert [index.k_factor for index in built.heads] == [REFINE_K_FACTOR] * keys.size(0)
    assert all(set(f) == {'nprobe', 'recall'} and f['recall'] >= SEARCH_RECALL for f in built.calibration)
    found = built.search(queries, heads, 5)
    assert recall_at_k(found, KNNIndex(keys, 'torch').search(queries, heads, 5)) >= 0.95
    h, x = heads[0].item(), queries[:1].numpy()
    dist, rows = built.heads[h].search(x, 5)
    torch.testing.assert_close(torch.from_numpy(dist[0]), (keys[h, rows[0]] - queries[0]).pow(2).sum(-1), rtol=1e-4, atol=1e-3)
    loaded = KNNIndex(keys, 'faiss', 'ivfpqfs', saved=built.serialized())
    assert [index.k_factor for index in loaded.heads] == [REFINE_K_FACTOR] * keys.size(0)
    assert loaded.calibration == built.calibration and torch.equal(loaded.search(queries, heads, 5), found)
    for bad, why in [('IVF8,PQ16x8fs', 'fast-scan PQ'), ('Flat,RFlat', 'RFlat re-ranks')]:
        with pytest.raises(UserError, match=why):
            KNNIndex(keys, 'faiss', bad)


def test_calibration_stops_where_the_codes_limit_recall(data):
    # clustered keys in 4 bits per dimension: a few lists hold the neighbours, but the codes
    # cannot rank them; visiting more lists stops paying, and the search does not visit all 51
    keys, _, _ = data
    for found in KNNIndex(keys, 'faiss', 'IVF51,SQ4').calibration:
        assert found['recall'] < SEARCH_RECALL - 0.05 and found['nprobe'] < 51


def build_vancouver(tmp_path, *options):
    """build_memory.py over a copy of data/vancouver.txt into tmp_path/mem; (text, store, result)."""
    text = tmp_path / 'mem.txt'
    text.write_text(open(os.path.join(ROOT, 'data', 'vancouver.txt'), encoding='utf-8').read(), encoding='utf-8')
    store = tmp_path / 'mem'
    return text, store, run_script('build_memory.py', str(text), f'--init_from={TINY}', f'--mem_store={store}', *options)


def test_recorded_used_overridden_and_reindexed(tmp_path):
    text, store, r = build_vancouver(tmp_path, '--layers=[2]', '--knn_index=hnsw')
    assert r.returncode == 0, r.stderr
    assert json.loads((store / 'memory.json').read_text())['knn_index'] == 'hnsw'
    model, enc = GPT.from_pretrained(TINY)
    memory = load_memory(str(store), model, enc)
    settings = RetrievalSettings([0, 0, 5, 0], 0.0, 0.0, 1.0, False, 0.0)
    assert memory.knn_index == 'hnsw' and memory.retrieving_layers(settings)[2].index.factory == 'HNSW32'
    assert memory.retrieving_layers(settings, 'cpu', SearchSettings(knn_index='flat'))[2].index.factory == 'Flat'
    identity = memory.identity()
    r = run_script('build_memory.py', f'--reindex={store}', '--knn_index=ivf')
    assert r.returncode == 0 and 'the model was not run' in r.stdout, r.stderr
    again = load_memory(str(store), model, enc)
    assert again.knn_index == 'ivf' and again.identity() == identity
    # sample.py searches another index on request, and records which
    r = run_script('sample.py', f'--init_from={TINY}', '--load_mem_store=True', f'--mem_store={store}',
                   '--knn_num=[0,0,5,0]', '--seeds=[1]', '--max_new_tokens=2', '--knn_index=hnsw', '--ef_search=32',
                   '--out_jsonl=/dev/stdout')
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec['method']['knn_index'] == 'hnsw' and rec['method']['index_params'] == {'efSearch': 32}
    assert rec['method']['searched_with'] == {'2': 'HNSW32, efSearch 32 (given)'}
    r = run_script('build_memory.py', str(text), f'--init_from={TINY}', f'--mem_store={tmp_path / "x"}',
                   '--knn_index=IVFbad')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and "knn_index='IVFbad': not a form this code builds" in r.stderr


def test_sweep_ids_do_not_change_without_an_index_choice():
    cfg = dict(sweep.DEFAULTS, init_from=TINY, memory="\nCats are kind.", knn_num=[0, 0, 5, 0], seeds=2,
               grid={'knn_index': ['', 'hnsw']})
    settings, _ = sweep.expand(cfg)
    plain, _ = sweep.expand(dict(cfg, grid={}))
    assert settings[0]['id'] == plain[0]['id'] and settings[1]['id'] != plain[0]['id']


def index_files(store):
    return sorted(f for f in os.listdir(store) if f.startswith('index-'))


def test_an_approximate_index_is_trained_once_and_saved_with_the_memory(tmp_path):
    _, store, r = build_vancouver(tmp_path, '--layers=[1,2]', '--knn_index=ivf')
    assert r.returncode == 0 and 'trained and saved' in r.stdout, r.stderr
    saved = index_files(store)
    assert len(saved) == 2  # one file per layer, all heads in it
    inodes = {f: os.stat(store / f).st_ino for f in saved}
    model, enc = GPT.from_pretrained(TINY)
    settings = RetrievalSettings([0, 5, 5, 0], 0.0, 0.0, 1.0, False, 0.0)
    memory = load_memory(str(store), model, enc)
    layers = memory.retrieving_layers(settings)
    # read, not trained again (a new index would be a new file), and it finds what a fresh build finds
    assert {f: os.stat(store / f).st_ino for f in index_files(store)} == inodes
    keys = memory.keys[2]
    queries, heads = keys[:, ::7].reshape(-1, keys.size(-1)), torch.arange(keys.size(0)).repeat_interleave(keys[:, ::7].size(1))
    fresh = KNNIndex(keys, 'faiss', 'ivf')
    assert torch.equal(layers[2].index.search(queries, heads, 5), fresh.search(queries, heads, 5))
    # a damaged index file is built again, with a warning; reading never writes the directory,
    # saving the rebuilt index is the explicit step (store.save_indexes, as build_memory.py takes it)
    (store / saved[0]).write_bytes(b'not an index')
    with pytest.warns(UserWarning, match='not the index saved for these keys'):
        damaged = load_memory(str(store), model, enc)
        damaged.retrieving_layers(settings)
    assert (store / saved[0]).read_bytes() == b'not an index'
    save_indexes(damaged)
    assert len(index_files(store)) == 2 and (store / saved[0]).stat().st_size > 100
    # a file rewritten by hand (here: without its calibration) no longer matches the checksum the
    # manifest records, so it is not read: the index is built (and calibrated) again, and saved
    # with its calibration only when asked
    with safe_open(str(store / saved[0]), 'np') as f:
        heads = {name: f.get_tensor(name) for name in f.keys()}
        calibration = json.loads(f.metadata()['calibration'])
    (store / saved[0]).write_bytes(save(heads))
    again = load_memory(str(store), model, enc)
    with pytest.warns(UserWarning, match='does not match the checksum'):
        assert again.retrieving_layers(settings)[1].index.calibration == calibration
    with safe_open(str(store / saved[0]), 'np') as f:
        assert not f.metadata()
    save_indexes(again)
    with safe_open(str(store / saved[0]), 'np') as f:
        assert json.loads(f.metadata()['calibration']) == calibration
    # re-indexing saves the new index beside the old (the tensors are the same); a new version of
    # the memory drops the indexes of the old one
    r = run_script('build_memory.py', f'--reindex={store}', '--knn_index=hnsw')
    assert r.returncode == 0 and 'trained and saved' in r.stdout, r.stderr
    assert len(index_files(store)) == 4
    more = tmp_path / 'more.txt'
    more.write_text("More about the city and its harbour.", encoding='utf-8')
    r = run_script('build_memory.py', str(more), f'--mem_store={store}', f'--init_from={TINY}', '--append=True')
    assert r.returncode == 0, r.stderr
    assert len(index_files(store)) == 2 and not set(index_files(store)) & set(saved)
