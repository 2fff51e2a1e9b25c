"""
The search index of a memory layer's stored keys, kept apart from the method's arithmetic
(memory.py): KNNIndex, one index per key/value head, FAISS or exact torch, built from the
keys or read from saved bytes (checked against them), and the search itself. Which index
and how it is calibrated is index_choice.py. SearchSettings is a run's search choice, made
and checked once from its config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from configurator import UserError
from index_choice import (
    CALIBRATION_K,
    KNN_INDEXES,
    REFINE_K_FACTOR,
    calibrate,
    check_index_params,
    faiss_message,
    index_factory,
    set_search_parameter,
    tuned_parameter,
)

SEARCHES = ('faiss', 'torch')
SELF_FOUND = 0.5  # a saved index must find at least this share of sampled stored keys themselves
CLAIM_SLACK = 0.15  # a saved calibration's recall may exceed what a sample measures by this much
SAMPLE_QUERIES = 32
MAX_SEARCH_PARAMETER = 1 << 16


def check_calibration(text, heads) -> list[dict] | None:
    """A saved index's calibration (JSON): one {parameter: value, 'recall': r} per head, the
    parameter the index has (nprobe up to its lists, efSearch), values in range. ValueError
    otherwise (the index is then built again)."""
    import faiss
    try:
        stored = json.loads(text) if text else None
    except ValueError:
        raise ValueError(f"a saved index's calibration is not JSON: {str(text)[:60]}") from None
    if stored is None:
        return None
    if not (isinstance(stored, list) and len(stored) == len(heads) and all(isinstance(f, dict) for f in stored)):
        raise ValueError(f"a saved index's calibration is not one entry per head: {str(stored)[:60]}")
    for index, found in zip(heads, stored):
        name = tuned_parameter(index)
        limit = faiss.extract_index_ivf(index).nlist if name == 'nprobe' else MAX_SEARCH_PARAMETER
        recall = found.get('recall')
        if set(found) - {name, 'recall'} or not isinstance(recall, (int, float)) or isinstance(recall, bool) \
                or not 0 <= recall <= 1 or (name is not None and not (
                    isinstance(found.get(name), int) and not isinstance(found.get(name), bool) and 1 <= found[name] <= limit)):
            raise ValueError(f"a saved index's calibration {str(found)[:60]} is not {{{name!r}: 1..{limit}, "
                             f"'recall': 0..1}}")
    return stored


def sample_recall(index, keys: np.ndarray, k: int = CALIBRATION_K) -> tuple[float, float]:
    """(share of SAMPLE_QUERIES stored keys the index finds themselves among its k + 1 nearest,
    recall@k of their nearest other keys against exact search, by row id)."""
    import faiss
    n = keys.shape[0]
    rows = np.linspace(0, n - 1, min(SAMPLE_QUERIES, n)).astype(np.int64)
    k = min(k, n - 1)
    if k < 1:
        return 1.0, 1.0
    _, exact = faiss.knn(keys[rows], keys, k + 1)
    _, found = index.search(keys[rows], k + 1)
    own = float(np.mean([r in f for r, f in zip(rows, found)]))
    recall = float(np.mean([len(set(e[e != r][:k]) & set(f[f != r])) / k for r, e, f in zip(rows, exact, found)]))
    return own, recall




@dataclass(frozen=True)
class SearchSettings:
    """A run's search choice (the config keys search, knn_index, nprobe, ef_search), checked
    when made. search: 'faiss' or 'torch' (exact, on the keys' device); None = FAISS on the
    CPU, torch on CUDA (backend). knn_index: the index searched; '' = the memory's own.
    nprobe / ef_search: an approximate index's search parameter; None = its calibrated one."""
    search: str | None = None
    knn_index: str = ''
    nprobe: int | None = None
    ef_search: int | None = None

    def __post_init__(self):
        check_search(self.search)
        if not isinstance(self.knn_index, str):
            raise UserError(f"knn_index={self.knn_index!r} must be a short name ({', '.join(KNN_INDEXES)}) "
                            f"or a FAISS factory string")
        check_index_params(self.params())

    @classmethod
    def from_config(cls, config: dict) -> SearchSettings:
        return cls(config['search'], config['knn_index'] or '', config['nprobe'], config['ef_search'])

    def backend(self, device) -> str:
        """The search that runs on `device`: the one asked for, else default_search."""
        return self.search or default_search(device)

    def params(self) -> dict:
        """The search parameters that are set, under FAISS's names (nprobe, efSearch)."""
        return {k: v for k, v in (('nprobe', self.nprobe), ('efSearch', self.ef_search)) if v is not None}

    def index_for(self, own: str) -> str:
        """The index searched in a memory whose own index is `own`."""
        return self.knn_index or own

    def is_default(self) -> bool:
        """True when the memory's own index is searched with its own parameters."""
        return not self.knn_index and not self.params()

    def as_dict(self) -> dict:
        return asdict(self)


# the FAISS index types the factory strings this code accepts make (their files' first four bytes)
INDEX_FOURCCS = {b'IwFl', b'IwSq', b'IwPQ', b'IwPf', b'IHNf', b'IHNs', b'IHNp', b'IxPq', b'IxSQ', b'IxPT', b'IxF2',
                 b'IxFI', b'IxRF'}


def check_index_header(data, n_keys, dim):
    """A saved index's bytes, checked before FAISS reads them: a type this code builds, and the
    header's dimension and count (int32 d, int64 ntotal after the four-byte type, in every FAISS
    index file) equal the keys'. FAISS trusts declared sizes up to 1 TiB; a header that lies is
    refused here without allocating. (Sizes declared deeper inside, in the lists or the graph,
    are not parsed: the manifest's checksum is what keeps a foreign file out.)"""
    import struct
    raw = np.asarray(data).view(np.uint8)[:16].tobytes() if not isinstance(data, bytes) else data[:16]
    if len(raw) < 16 or raw[:4] not in INDEX_FOURCCS:
        raise ValueError(f"a saved index is not of a type this code builds (it starts {raw[:4]!r})")
    d, ntotal = struct.unpack('<iq', raw[4:16])
    if d != dim or ntotal != n_keys:
        raise ValueError(f"a saved index's header declares {ntotal} keys of size {d}, not {n_keys} of size {dim}")


class KNNIndex:
    """Squared-L2 nearest-neighbour search over one layer's stored keys (H, N, d), one index per
    head: FAISS (IndexFlatL2, exact, the reference's, on the GPU with faiss-gpu; or an
    approximate index chosen by knn_index) or an exact torch search on the keys' device.
    An approximate index is searched with `params` (nprobe, efSearch) where given, else with
    each head's calibrated value (calibrate), kept in `calibration`. saved: the index as
    serialized() gave it, to use instead of building it again (checked against the keys)."""

    def __init__(self, keys, kind, knn_index='flat', params=None, saved=None):
        self.kind, self.n_entries = kind, keys.size(1)
        self.factory = index_factory(knn_index, keys.size(1), keys.size(2))
        self.approximate = self.factory != 'Flat'
        self.given = params = check_index_params(params)
        self.calibration = None  # per head: {parameter: value, 'recall': recall@10} of an approximate index
        self.calibrated_now = False  # calibration measured here, not read from `saved`
        self.from_saved = saved is not None  # read from saved bytes, not trained here
        if kind == 'faiss':
            import faiss
            gpu = keys.is_cuda and hasattr(faiss, 'StandardGpuResources') and self.factory == 'Flat'
            self.faiss_gpu = faiss.StandardGpuResources() if gpu else None
            self.heads = []
            head_keys = lambda h: np.ascontiguousarray(keys[h].detach().to('cpu', torch.float32).numpy())  # noqa: E731
            for h in range(keys.size(0)):
                if saved is not None:
                    check_index_header(saved[0][f'head{h}'], keys.size(1), keys.size(2))
                    index = faiss.deserialize_index(saved[0][f'head{h}'])
                    if index.ntotal != keys.size(1) or index.d != keys.size(2):
                        raise ValueError(f"a saved index holds {index.ntotal} keys of size {index.d}, not "
                                         f"{keys.size(1)} of size {keys.size(2)}")
                    self.heads.append(index)
                    continue
                x = head_keys(h)
                if self.factory == 'Flat':
                    index = faiss.IndexFlatL2(keys.size(2))
                else:
                    try:
                        index = faiss.index_factory(keys.size(2), self.factory, faiss.METRIC_L2)
                    except RuntimeError as e:
                        raise UserError(f"knn_index={knn_index!r}: FAISS cannot make a {self.factory!r} index "
                                        f"({faiss_message(e)}); use one of "
                                        f"{', '.join(KNN_INDEXES)} or a FAISS factory string") from None
                    if isinstance(index, faiss.IndexRefine):  # saved with the index
                        index.k_factor = REFINE_K_FACTOR
                    if not index.is_trained:
                        try:
                            index.train(x)
                        except RuntimeError as e:
                            raise UserError(f"knn_index={knn_index!r}: FAISS cannot train {self.factory!r} on "
                                            f"{x.shape[0]} keys ({faiss_message(e)}); an IVF "
                                            f"index needs at least 39 keys per list: use fewer lists") from None
                index.add(x)
                if gpu:
                    index = faiss.index_cpu_to_gpu(self.faiss_gpu, keys.device.index or 0, index)
                self.heads.append(index)
            for index in self.heads:  # given parameters first: one the index lacks fails at once
                for name, value in params.items():
                    set_search_parameter(index, name, value, self.factory)
            if self.factory != 'Flat' and tuned_parameter(self.heads[0]) not in params:
                # saved with the index, or measured now (calibrate leaves the index set to its choice)
                stored = check_calibration(saved[1].get('calibration'), self.heads) if saved is not None else None
                self.calibrated_now = not stored
                self.calibration = stored or [calibrate(index, head_keys(h), self.factory)
                                              for h, index in enumerate(self.heads)]
                for index, found in zip(self.heads, self.calibration):
                    for name, value in found.items():
                        if name != 'recall':
                            set_search_parameter(index, name, value, self.factory)
            if saved is not None:
                self.check_saved(head_keys)
        else:
            if self.factory != 'Flat':
                raise UserError(f"search='torch' is exact; the approximate index knn_index={knn_index!r} needs "
                                f"search='faiss'")
            self.keys = keys.float()
            self.key_sqnorms = self.keys.pow(2).sum(-1)  # (H, N)

    def check_saved(self, head_keys) -> None:
        """A saved index must be over these keys: on a fixed sample of stored keys, each head must
        find most of them themselves (an index over other keys, or with shifted ids, finds almost
        none: ValueError, and the index is built again). A stored calibration claim is measured
        again on the sample; one that falls clearly short is replaced by a new calibration."""
        import warnings
        for h, index in enumerate(self.heads):
            keys = head_keys(h)
            own, recall = sample_recall(index, keys)
            if own < SELF_FOUND:
                raise ValueError(f"head {h}'s saved index finds {own:.0%} of a sample of the stored keys themselves; "
                                 f"it was not built over these keys")
            claimed = (self.calibration or [{}] * len(self.heads))[h].get('recall')
            if claimed is not None and recall < claimed - CLAIM_SLACK:
                warnings.warn(f"head {h}'s saved calibration claims recall@{CALIBRATION_K} {claimed:.3f}, a sample "
                              f"measures {recall:.3f}; calibrating it again", stacklevel=4)
                self.calibration[h] = calibrate(index, keys, self.factory)
                self.calibrated_now = True

    def serialized(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The index as safetensors stores it, for KNNIndex(..., saved=...): each head's FAISS
        index as bytes (uint8 tensors 'head0', 'head1', ...) and, as metadata, the heads'
        calibrated search parameters (JSON)."""
        import faiss
        heads = {f'head{h}': faiss.serialize_index(index) for h, index in enumerate(self.heads)}
        return heads, dict(calibration=json.dumps(self.calibration))

    def describe(self) -> str:
        """The index and how it searches, in words: 'IVF2000,Flat, nprobe 8-16 (calibrated:
        recall@10 >= 0.990)', or 'HNSW32, efSearch 64 (given)'."""
        values = {name: [value] for name, value in self.given.items()}
        for found in self.calibration or []:
            for name, value in found.items():
                if name != 'recall':
                    values.setdefault(name, []).append(value)
        searched = ''.join(f", {name} {min(v)}" + (f"-{max(v)}" if max(v) != min(v) else '') for name, v in values.items())
        if self.calibration:
            searched += f" (calibrated: recall@{CALIBRATION_K} >= {min(f['recall'] for f in self.calibration):.3f})"
        return self.factory + searched + (' (given)' if self.given else '')

    def search(self, queries: torch.Tensor, heads: torch.Tensor, k: int) -> torch.Tensor:
        """The k nearest stored keys of each query (n, d) in its head's index. Returns indices
        (n, k), -1 where there are fewer than k. FAISS: one call per run of queries of one head,
        on its slice of the queries (a layer's selected token-heads come sorted by head: one call
        per head that has queries); torch: one batched search of every head (queries sorted by
        head and padded to the busiest head's count)."""
        n = queries.size(0)
        kk = min(k, self.n_entries)
        if n == 0 or kk == 0:
            return torch.full((n, k), -1, dtype=torch.long, device=queries.device)
        q32 = queries.detach().float()
        if self.kind == 'faiss':
            # runs of one head, in the queries' order (a layer's token-heads come sorted by head)
            run_heads, counts = torch.unique_consecutive(heads, return_counts=True)
            found = torch.from_numpy(self._faiss_search(q32, run_heads.tolist(), counts.tolist(), kk))
        else:
            order = heads.argsort(stable=True)
            found = torch.empty(n, kk, dtype=torch.long, device=queries.device)
            found[order] = self._torch_search(q32[order], heads[order], torch.bincount(heads, minlength=self.keys.size(0)), kk)
        if kk < k:
            found = torch.cat((found, found.new_full((n, k - kk), -1)), dim=1)
        return found.to(queries.device)

    def _faiss_search(self, q32: torch.Tensor, run_heads: list[int], counts: list[int], k: int) -> np.ndarray:
        """Queries (n, d) in runs of one head (counts[i] queries of head run_heads[i]): (n, k) row
        ids. (FAISS keeps its own threads: one thread for small searches, tried, was slower
        here, 3.0 against 2.6 ms per token in bench_memory's cached decoding at 10^3.)"""
        import faiss
        x = np.ascontiguousarray(q32.cpu().numpy())
        ids = np.empty((x.shape[0], k), dtype=np.int64)
        dist = np.empty((x.shape[0], k), dtype=np.float32)
        start = 0
        for h, c in zip(run_heads, counts):  # the index's own search, without the wrapper's allocations
            self.heads[h].search_c(c, faiss.swig_ptr(x[start:]), k, faiss.swig_ptr(dist[start:]), faiss.swig_ptr(ids[start:]))
            start += c
        return ids

    def _torch_search(self, q32: torch.Tensor, heads: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
        """Exact search of queries (n, d) sorted by head (heads, counts per head) in one batch:
        each head's queries padded to the largest count, (H, m, N) distances, top k."""
        H, m = counts.size(0), int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(heads.size(0), device=heads.device) - starts[heads]  # each query's place in its head
        padded = q32.new_zeros(H, m, q32.size(1))
        padded[heads, slot] = q32
        dist = padded.pow(2).sum(-1, keepdim=True) - 2 * padded @ self.keys.transpose(1, 2) + self.key_sqnorms[:, None]
        return dist.topk(k, dim=-1, largest=False).indices[heads, slot]


def check_search(search: str | None) -> None:
    if search is not None and search not in SEARCHES:
        raise UserError(f"search={search!r} must be one of {', '.join(map(repr, SEARCHES))} "
                        f"(or None: faiss on the CPU, torch on CUDA)")


def default_search(device) -> str:
    """FAISS on the CPU; on CUDA the exact torch search keeps everything on the GPU."""
    if str(device).startswith('cuda'):
        return 'torch'
    try:
        import faiss  # noqa: F401
        return 'faiss'
    except ImportError:
        return 'torch'
