"""
Which FAISS index a memory layer is searched with, and how: knn_index choices (a short name
or a FAISS factory string, checked before FAISS sees it, since FAISS crashes on some), the
factory string sized for a memory, and the calibration of an approximate index's search
parameter (the smallest nprobe / efSearch that finds the neighbours). knn_index.py builds
and searches the indexes.
"""

import math
import re

import numpy as np

from configurator import UserError

# index choices by short name (FAISS factory strings are taken as they are): 'flat' is the
# reference's exact IndexFlatL2; the others are approximate: a graph, inverted lists over full
# keys, over keys quantised to 8 bits per dimension (a quarter of the memory), or product-
# quantised to d/4 bytes. IVF's nlist grows as ~2 sqrt(N) (at most N/39, so each list trains
# on 39 points): at 10^6 keys, 2,000 lists cost 5-13% less of the memory's time per decoded
# token than 4,000 at about the same recall (decoding reads the centroids from memory at every
# search), and train 3x faster (docs/bench_memory_cpu.txt)
KNN_INDEXES = {'flat': 'Flat', 'hnsw': 'HNSW32', 'ivf': 'IVF{nlist},Flat', 'ivfsq': 'IVF{nlist},SQ8',
               'ivfpq': 'IVF{nlist},PQ{m}', 'ivfpqfs': 'RR{d},IVF{nlist},PQ{d}x4fs,RFlat'}
# 'ivfpqfs': fast-scan PQ (4 bits per dimension, scanned in SIMD registers) finds REFINE_K_FACTOR x k
# candidates, which are ranked again by exact distance to the full keys (RFlat, which keeps a copy of
# them, as IVF,Flat does). A random rotation first (RR) spreads a model's few large key dimensions
# over all of them, so that 16 levels per dimension suit each: on SmolLM2's keys at 10^6 it lifts
# recall@5 from 0.91 to 0.95 at the same search, and 8 candidates per neighbour against 4 to 0.97
# (docs/bench_memory_cpu.txt)
REFINE_K_FACTOR = 8
# an approximate index's search parameter (IVF's nprobe, HNSW's efSearch), where none is given,
# is calibrated when the index is built: the smallest value on SEARCH_LADDERS whose recall@10 on
# stored keys (each searched for its 10 nearest others) reaches SEARCH_RECALL; store.py saves it
# with the index. FAISS's own defaults (nprobe 1, efSearch 16) miss many neighbours, and no fixed
# value suits every size: 16-24 lists of 25 are needed at 10^3 keys, 3 of 2,000 at 10^6 (clustered
# random keys; 12 of 2,000 on SmolLM2's)
SEARCH_RECALL = 0.98
SEARCH_LADDERS = dict(nprobe=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256],
                      efSearch=[16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024])
CALIBRATION_QUERIES, CALIBRATION_K = 256, 10
SEARCH_PLATEAU = 0.002  # a doubling of the parameter that gains less recall than this ends the calibration


def faiss_message(e: Exception) -> str:
    """FAISS's own reason, without its C++ source location."""
    text = ' '.join(str(e).split())
    return re.sub(r"^Error in .*? at \S+:\d+: ", '', text).split('Error: ')[-1].strip(" '")[:160]


FACTORY_FORMS = ("Flat", "IVF<lists>[_HNSW<M>],Flat", "IVF<lists>[_HNSW<M>],SQ4|SQ6|SQ8|SQfp16",
                 "IVF<lists>[_HNSW<M>],PQ<m>[x<bits>]", "IVF<lists>[_HNSW<M>],PQ<m>x4fs (fast scan)", "HNSW<M>[,Flat]",
                 "any IVF or HNSW form followed by ,RFlat (exact re-ranking)",
                 "and any of these after PCA<d'>, PCAR<d'>, OPQ<m>[_<d'>] or RR<d'>")


def check_factory(factory: str, d: int) -> None:
    """A FAISS factory string this code lets FAISS build: the forms of FACTORY_FORMS with their
    numbers in range (FAISS itself crashes on some, e.g. HNSW1, PQ16x0, NSG0, or accepts PCA0).
    IVF<lists>_HNSW<M> finds an IVF index's lists with an HNSW graph over the centroids instead
    of scanning them all; a trailing RFlat ranks REFINE_K_FACTOR x k candidates again by exact
    distance (KNNIndex sets that factor)."""
    bad = lambda why: UserError(f"knn_index={factory!r}: {why}; the factory strings taken are "  # noqa: E731
                                f"{'; '.join(FACTORY_FORMS)} (or a short name: {', '.join(KNN_INDEXES)})")
    parts, dim = factory.split(','), d
    m = re.fullmatch(r"(PCAR?|OPQ|RR)(\d+)(?:_(\d+))?", parts[0])
    if m and len(parts) > 1:
        kind, a, b = m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None
        out = b if kind == 'OPQ' and b is not None else (a if kind != 'OPQ' else d)
        if not 1 <= a <= d or not 1 <= out <= d or (kind == 'OPQ' and (out % a or b is not None and b < a)):
            raise bad(f"{parts[0]} needs sizes from 1 to the key size {d} (OPQ<m>_<d'>: m dividing d')")
        dim, parts = out, parts[1:]
    if parts == ['Flat']:
        return
    if len(parts) > 1 and parts[-1] == 'RFlat':
        if not re.fullmatch(r"(IVF|HNSW)\d+.*", parts[0]):
            raise bad("RFlat re-ranks an approximate index's candidates: it follows an IVF or HNSW form")
        parts = parts[:-1]
    def check_hnsw(M):
        if not 4 <= int(M) <= 256:
            raise bad(f"HNSW's M (neighbours per node) must be 4 to 256, not {M}")
    m = re.fullmatch(r"HNSW(\d+)", parts[0])
    if m and parts[1:] in ([], ['Flat']):
        return check_hnsw(m.group(1))
    m = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", parts[0])
    if m and len(parts) == 2:
        if m.group(2):
            check_hnsw(m.group(2))
        if not 1 <= int(m.group(1)) <= 1 << 20:
            raise bad(f"IVF needs 1 to 2^20 lists, not {m.group(1)}")
        if parts[1] in ('Flat', 'SQ4', 'SQ6', 'SQ8', 'SQfp16'):
            return
        pq = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs)?", parts[1])
        if pq:
            sub, bits = int(pq.group(1)), int(pq.group(2) or 8)
            if not 1 <= sub <= dim or dim % sub or not 1 <= bits <= 16:
                raise bad(f"PQ<m>x<bits> needs m dividing the key size {dim} and 1 to 16 bits, not {parts[1]}")
            if pq.group(3) and bits != 4:
                raise bad(f"fast-scan PQ (fs) codes 4 bits per sub-vector: PQ{sub}x4fs, not {parts[1]}")
            return
    raise bad("not a form this code builds")


def index_factory(knn_index: str, n: int, d: int) -> str:
    """The FAISS factory string for a knn_index choice: a short name of KNN_INDEXES, sized for n
    stored keys of size d, or a factory string as given ('' means 'flat'), checked (check_factory)."""
    spec = knn_index or 'flat'
    if spec not in KNN_INDEXES:
        check_factory(spec, d)
        return spec
    nlist = max(1, min(int(2 * math.sqrt(n)), n // 39))
    m = next(m for m in range(max(1, d // 4), 0, -1) if d % m == 0)
    return KNN_INDEXES[spec].format(nlist=nlist, m=m, d=d)


def tuned_parameter(index) -> str | None:
    """The search parameter of a FAISS index that trades speed for recall and is calibrated
    (SEARCH_LADDERS): 'nprobe' for IVF indexes, 'efSearch' for HNSW, None for the others."""
    import faiss
    space = faiss.ParameterSpace()
    space.initialize(index)
    names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
    return next((name for name in SEARCH_LADDERS if name in names), None)


def set_search_parameter(index, name: str, value: int, factory: str) -> None:
    import faiss
    try:
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    except RuntimeError:
        option = dict(nprobe='nprobe', efSearch='ef_search')[name]
        raise UserError(f"{option}={value}: the {factory!r} index has no {name}; nprobe is for IVF indexes, "
                        f"ef_search for HNSW: leave {option} unset") from None


def calibrate(index, keys: np.ndarray, factory: str) -> dict:
    """The search parameter an approximate index is searched with when none is given: the
    smallest on SEARCH_LADDERS (nprobe up to the index's number of lists) at which its
    recall@CALIBRATION_K reaches SEARCH_RECALL. Short of that (a doubling of the parameter gained
    less than SEARCH_PLATEAU, or the ladder ended), the smallest value tried whose recall is
    within SEARCH_PLATEAU of the best. Recall is measured
    leave-one-out: CALIBRATION_QUERIES stored keys (a fixed sample), each searched for its
    nearest other stored keys, against exact search; a result counts if it is no farther than
    the k-th exact neighbour (ties are neighbours too). Returns {name: value, 'recall': r}."""
    import faiss
    n = keys.shape[0]
    rows = np.sort(np.random.default_rng(0).choice(n, min(CALIBRATION_QUERIES, n), replace=False))
    queries, k = keys[rows], min(CALIBRATION_K, n - 1)
    if k < 1:
        return dict(recall=1.0)
    exact_d, exact_i = faiss.knn(queries, keys, k + 1)
    # leave the query's own row out; where a duplicate stood in for it, the last neighbour goes
    kth = np.array([d[i != r][k - 1] for d, i, r in zip(exact_d, exact_i, rows)])
    # a found key counts up to this distance: float32 rounding differs between the two searches
    farthest = kth + 1e-5 * (kth + (queries ** 2).sum(1))

    def recall():
        found_d, found_i = index.search(queries, k + 1)
        others = (found_i != rows[:, None]) & (found_i >= 0)
        hits = ((found_d <= farthest[:, None]) & others).sum(1)
        return float(np.minimum(hits, k).mean() / k)

    name = tuned_parameter(index)
    if name is None:
        return dict(recall=recall())
    ladder = SEARCH_LADDERS[name]
    if name == 'nprobe':
        nlist = faiss.extract_index_ivf(index).nlist
        ladder = [v for v in ladder if v < nlist] + [nlist]
    tried = {}  # value: recall, in ladder order
    for value in ladder:
        set_search_parameter(index, name, value, factory)
        tried[value] = recall()
        if tried[value] >= SEARCH_RECALL:
            break
        half = [v for v in tried if 2 * v <= value]
        if half and tried[value] < tried[half[-1]] + SEARCH_PLATEAU:
            break  # twice the search found no more: the index's codes (SQ, PQ) limit its recall
    if tried[value] < SEARCH_RECALL:
        # not reached: the cheapest value within SEARCH_PLATEAU of the best recall found
        best = max(tried.values())
        value = min(v for v, r in tried.items() if r >= best - SEARCH_PLATEAU)
        set_search_parameter(index, name, value, factory)
    return {name: value, 'recall': tried[value]}


def check_index_params(params: dict | None) -> dict:
    """Search parameters for approximate indexes: nprobe (IVF lists visited), efSearch (HNSW)."""
    params = {k: v for k, v in (params or {}).items() if v is not None}
    for k, v in params.items():
        if k not in ('nprobe', 'efSearch') or not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{k}={v!r}: the search parameters are nprobe and ef_search, whole numbers >= 1")
    return params


def check_knn_index(knn_index: str, d: int) -> None:
    """A one-line error for an index choice FAISS cannot make (before anything is built)."""
    factory = index_factory(knn_index, 10_000, d)
    if factory != 'Flat':
        import faiss
        try:
            faiss.index_factory(d, factory, faiss.METRIC_L2)
        except RuntimeError as e:
            raise UserError(f"knn_index={knn_index!r}: FAISS cannot make a {factory!r} index "
                            f"({faiss_message(e)}); use one of {', '.join(KNN_INDEXES)} "
                            f"or a FAISS factory string") from None
