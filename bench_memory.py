"""
Memory size against search cost: exact and approximate indexes from 10^3 to 10^6 stored
tokens per head, measured in one run on one machine.

    python bench_memory.py                         # 10^3 .. 10^6, flat, hnsw, ivf
    python bench_memory.py --sizes=[1000,10000] --indexes=['flat','hnsw']   # a quick look

Keys are random vectors of GPT-2 small's head size (64), drawn around 1,024 centres so that
they have the clustered structure a model's keys have (uniform noise would be the worst case
for any approximate index); the queries are stored keys plus noise. One head is built and
timed per size and index (heads are independent, one index each), and the per-token figures
scale it to a layer of 12 heads times 3 memory layers (Table 1): in cached decoding about 2
new token-heads per head look up the memory per token, in exact decoding every selected
token-head of the context does again (about 30 per head for a 100-token context). For each
size and index it prints: build time and rows/s; recall@k of the index against exact search;
search time per query; the search time added per generated token, cached and exact; the
index's memory (FAISS's serialized size) and the keys and values on disk (float32). The
target: an approximate index at 10^6 adds at most 2x what exact search adds at 10^3, at
recall@k >= 0.95.
"""

import sys
import time

import torch

from configurator import configure, run_cli
from memory import KNNIndex

DEFAULTS = dict(
    sizes=[1000, 10_000, 100_000, 1_000_000],  # stored tokens per head
    indexes=['flat', 'hnsw', 'ivf'],  # knn_index choices to measure
    ef_search=64,          # HNSW's efSearch
    nprobe=16,             # IVF's lists visited
    k=5,                   # neighbours per query (Table 1's k)
    queries=512,           # queries timed per measurement
    head_size=64,          # d
    heads=12,              # heads per memory layer (for the per-token figures)
    layers=3,              # memory layers (for the per-token figures)
    cached_queries=2,      # token-heads per head that look up the memory per token, cached decoding
    exact_queries=30,      # ... exact decoding (every selected token-head of the context, again)
    threads=0,             # torch/FAISS threads; 0 = the default
    seed=0,                # random keys
)


def clustered(n, d, centres, gen):
    idx = torch.randint(0, centres.size(0), (n,), generator=gen)
    return centres[idx] + torch.randn(n, d, generator=gen)


def timed(fn, repeat=3):
    best = float('inf')
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def index_bytes(index):
    import faiss
    return sum(faiss.serialize_index(h).nbytes for h in index.heads)


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__, [sys.modules[__name__]])
    if cfg['threads']:
        import faiss
        torch.set_num_threads(cfg['threads'])
        faiss.omp_set_num_threads(cfg['threads'])
    gen = torch.Generator().manual_seed(cfg['seed'])
    d, k = cfg['head_size'], cfg['k']
    centres = torch.randn(1024, d, generator=gen) * 2.0
    per_token = cfg['heads'] * cfg['layers']
    print(f"one head of size {d}, k {k}; per-token figures for {cfg['heads']} heads x {cfg['layers']} layers, "
          f"{cfg['cached_queries']} (cached) / {cfg['exact_queries']} (exact) queries per head per token; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'tokens':>9} {'index':>6} {'build s':>8} {'rows/s':>9} {'recall@k':>8} {'us/query':>9} "
          f"{'+ms/tok cached':>14} {'+ms/tok exact':>13} {'index MB':>8} {'disk MB':>8}")
    baseline = {}
    for n in cfg['sizes']:
        keys = clustered(n, d, centres, gen)[None]  # (1, n, d): one head
        queries = keys[0, torch.randint(0, n, (cfg['queries'],), generator=gen)] + 0.5 * torch.randn(
            cfg['queries'], d, generator=gen)
        heads = torch.zeros(cfg['queries'], dtype=torch.long)
        exact = KNNIndex(keys, 'faiss', 'flat').search(queries, heads, k)
        for name in cfg['indexes']:
            params = {'hnsw': dict(efSearch=cfg['ef_search']), 'ivf': dict(nprobe=cfg['nprobe']),
                      'ivfpq': dict(nprobe=cfg['nprobe'])}.get(name, {})
            index, build = timed(lambda keys=keys, name=name, params=params: KNNIndex(keys, 'faiss', name, params),
                                 repeat=1)
            found, t = timed(lambda index=index, q=queries, h=heads: index.search(q, h, k))
            hits = sum(len(set(f) & set(e)) for f, e in zip(found.tolist(), exact.tolist()))
            recall = hits / exact.numel()
            per_query = t / cfg['queries']
            # the search's cost per generated token: per head, a batch of that many queries
            qc, qe = cfg['cached_queries'], cfg['exact_queries']
            _, tc = timed(lambda index=index, q=queries[:qc], h=heads[:qc]: index.search(q, h, k))
            _, te = timed(lambda index=index, q=queries[:qe], h=heads[:qe]: index.search(q, h, k))
            cached_ms, exact_ms = tc * per_token * 1e3, te * per_token * 1e3
            if n == cfg['sizes'][0] and name == 'flat':
                baseline = dict(cached=cached_ms, exact=exact_ms)
            disk = 2 * n * d * 4 * per_token / 1e6
            print(f"{n:>9} {name:>6} {build:>8.2f} {n / build:>9.0f} {recall:>8.3f} {per_query * 1e6:>9.1f} "
                  f"{cached_ms:>14.3f} {exact_ms:>13.3f} {index_bytes(index) / 1e6:>8.1f} {disk:>8.1f}", flush=True)
            if baseline and n == cfg['sizes'][-1] and name != 'flat':
                ok = exact_ms <= 2 * baseline['exact'] and recall >= 0.95
                print(f"          {name} at {n}: {cached_ms / baseline['cached']:.2f}x (cached) and "
                      f"{exact_ms / baseline['exact']:.2f}x (exact) the time exact search adds at {cfg['sizes'][0]}, "
                      f"recall@{k} {recall:.3f}: target (<= 2x, >= 0.95) {'met' if ok else 'NOT met'}")
    print("disk MB: keys and values, float32, for all heads and layers (x 0.5 in float16)")


if __name__ == '__main__':
    run_cli(main)
