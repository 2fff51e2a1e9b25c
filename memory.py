"""
The persistent attention memory of METHOD.md.

  RetrievalSettings  section 2's parameters (k per layer, MF, BF, TS, resid_only, r), checked
                     once when made.
  LayerMemory        one layer's memory in use: the method's equations (METHOD.md section 2,
                     steps 1-7: select, search, memory_values, update_values), called by that
                     layer's attention.
  KNNIndex           exact squared-L2 search of one layer's stored keys, one index per head.
  Memory             what was stored: per memory layer, every head's keys and values (H, N, d),
                     and where they came from (model, text, token ids, bookkeeping settings).
                     Built from text (build), saved and loaded as a directory (save, load), or
                     imported from the reference code's layout (import_reference). It hands out
                     LayerMemory objects for a RetrievalSettings (retrieving_layers), building
                     each layer's search index once however many settings use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from configurator import UserError
from files import cannot_write, make_dirs, sha256_file, umask_mode, write_whole
from model import FINGERPRINT_SCHEME, encode, expand_kv

FORMAT = 'gpt2-persistent-memory'
FORMAT_VERSION = 2        # 2: tensors in memory-<checksum>.safetensors, fingerprints of every weight
READABLE_VERSIONS = (1, 2)
MANIFEST = 'memory.json'
LOCK = 'memory.lock'
TMP_PREFIX = '.tmp-'
SEARCHES = ('faiss', 'torch')
# index choices by short name (FAISS factory strings are taken as they are): 'flat' is the
# reference's exact IndexFlatL2; the others are approximate. IVF's nlist grows as ~4 sqrt(N)
# (at most N/39, so each list trains on 39 points); PQ uses d/4 sub-quantizers of 8 bits.
STORE_DTYPES = {'float32': torch.float32, 'float16': torch.float16}  # how keys and values are saved
# knn_index short names: exact search, a graph, inverted lists (~4 sqrt(N) of them) over full
# keys, over keys quantised to 8 bits per dimension (a quarter of the memory, less to read per
# search), or product-quantised to d/4 bytes
KNN_INDEXES = {'flat': 'Flat', 'hnsw': 'HNSW32', 'ivf': 'IVF{nlist},Flat', 'ivfsq': 'IVF{nlist},SQ8',
               'ivfpq': 'IVF{nlist},PQ{m}'}
# an approximate index's search parameter (IVF's nprobe, HNSW's efSearch), where none is given,
# is calibrated when the index is built: the smallest value on SEARCH_LADDERS whose recall@10 on
# stored keys (each searched for its 10 nearest others) reaches SEARCH_RECALL; it is saved with
# the index. FAISS's own defaults (nprobe 1, efSearch 16) miss many neighbours, and no fixed
# value suits every size: 16 lists of 25 are needed at 10^3 keys, 6 of 4,000 at 10^6 (clustered
# random keys; 16 of 4,000 on SmolLM2's)
SEARCH_RECALL = 0.98
SEARCH_LADDERS = dict(nprobe=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256],
                      efSearch=[16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024])
CALIBRATION_QUERIES, CALIBRATION_K = 256, 10
SEARCH_PLATEAU = 0.002  # a doubling of the parameter that gains less recall than this ends the calibration
MEMORY_KEYS = ('unrotated', 'rotated')  # the form keys are stored in on RoPE models (METHOD.md section 8)


# -----------------------------------------------------------------------------
# retrieval: METHOD.md section 2

def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class RetrievalSettings:
    """The retrieval parameters of METHOD.md section 2, like GPTConfig for the model. Bad values
    are refused when the settings are made, with a one-line UserError."""
    knn_num: tuple                      # k per layer, one entry per layer; 0 = no memory in that layer
    mem_frac: float = 0.0               # MF
    bookkeeping_frac: float = 0.0       # BF
    knn_softmax_influence: float = 1.0  # TS
    resid_only: bool = False
    resid_frac: float = 0.0             # r

    def __post_init__(self):
        knn_num = self.knn_num
        if not isinstance(knn_num, (list, tuple)) or not knn_num:
            raise UserError(f"knn_num={knn_num!r} must be a list with one k per layer, e.g. [0, 0, 5, 0]")
        for i, k in enumerate(knn_num):
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise UserError(f"knn_num[{i}]={k!r}: each k must be a whole number >= 0")
        object.__setattr__(self, 'knn_num', tuple(knn_num))
        for name in ('mem_frac', 'bookkeeping_frac', 'knn_softmax_influence'):
            val = getattr(self, name)
            if not _is_number(val) or val < 0:
                raise UserError(f"{name}={val!r} must be a number >= 0")
            object.__setattr__(self, name, float(val))
        if not _is_number(self.resid_frac) or not 0 <= self.resid_frac <= 1:
            raise UserError(f"resid_frac={self.resid_frac!r} must be between 0 and 1")
        object.__setattr__(self, 'resid_frac', float(self.resid_frac))
        if not isinstance(self.resid_only, bool):
            raise UserError(f"resid_only={self.resid_only!r} must be True or False")

    @classmethod
    def from_config(cls, config: dict, n_layer: int) -> RetrievalSettings:
        """The settings a run config asks for (knn_num None = no memory), for a model of n_layer layers."""
        knn_num = config['knn_num'] if config['knn_num'] is not None else [0] * n_layer
        settings = cls(knn_num, config['mem_frac'], config['bookkeeping_frac'], config['knn_softmax_influence'],
                       config['resid_only'], config['resid_frac'])
        settings.check_layers(n_layer)
        return settings

    def check_layers(self, n_layer: int) -> None:
        if len(self.knn_num) != n_layer:
            raise UserError(f"knn_num has {len(self.knn_num)} entries, the model has {n_layer} layers; "
                            f"give one k per layer, e.g. --knn_num={[0] * n_layer}")

    @property
    def layers(self) -> list[int]:
        """The layers that retrieve (k > 0)."""
        return [i for i, k in enumerate(self.knn_num) if k > 0]

    def as_dict(self) -> dict:
        return dict(asdict(self), knn_num=list(self.knn_num))


def faiss_message(e: Exception) -> str:
    """FAISS's own reason, without its C++ source location."""
    text = ' '.join(str(e).split())
    return re.sub(r"^Error in .*? at \S+:\d+: ", '', text).split('Error: ')[-1].strip(" '")[:160]


def index_factory(knn_index: str, n: int, d: int) -> str:
    """The FAISS factory string for a knn_index choice: a short name of KNN_INDEXES, sized for n
    stored keys of size d, or a factory string as given ('' means 'flat')."""
    spec = knn_index or 'flat'
    if spec not in KNN_INDEXES:
        return spec
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    m = next(m for m in range(max(1, d // 4), 0, -1) if d % m == 0)
    return KNN_INDEXES[spec].format(nlist=nlist, m=m)


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
        self.given = params = check_index_params(params)
        self.calibration = None  # per head: {parameter: value, 'recall': recall@10} of an approximate index
        self.calibrated_now = False  # calibration measured here, not read from `saved`
        if kind == 'faiss':
            import faiss
            gpu = keys.is_cuda and hasattr(faiss, 'StandardGpuResources') and self.factory == 'Flat'
            self.faiss_gpu = faiss.StandardGpuResources() if gpu else None
            self.heads = []
            head_keys = lambda h: np.ascontiguousarray(keys[h].detach().to('cpu', torch.float32).numpy())  # noqa: E731
            for h in range(keys.size(0)):
                if saved is not None:
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
                stored = json.loads(saved[1].get('calibration') or 'null') if saved is not None else None
                if stored is not None and not (isinstance(stored, list) and len(stored) == len(self.heads)
                                               and all(isinstance(found, dict) for found in stored)):
                    raise ValueError(f"a saved index's calibration is not one entry per head: {str(stored)[:60]}")
                self.calibrated_now = not stored
                self.calibration = stored or [calibrate(index, head_keys(h), self.factory)
                                              for h, index in enumerate(self.heads)]
                for index, found in zip(self.heads, self.calibration):
                    for name, value in found.items():
                        if name != 'recall':
                            set_search_parameter(index, name, value, self.factory)
        else:
            if self.factory != 'Flat':
                raise UserError(f"search='torch' is exact; the approximate index knn_index={knn_index!r} needs "
                                f"search='faiss'")
            self.keys = keys.float()
            self.key_sqnorms = self.keys.pow(2).sum(-1)  # (H, N)

    def serialized(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The index as safetensors stores it, for KNNIndex(..., saved=...): each head's FAISS
        index as bytes (uint8 tensors 'head0', 'head1', ...) and, as metadata, the heads'
        calibrated search parameters (JSON)."""
        import faiss
        heads = {f'head{h}': faiss.serialize_index(index) for h, index in enumerate(self.heads)}
        return heads, dict(calibration=json.dumps(self.calibration))

    def describe(self) -> str:
        """The index and how it searches, in words: 'IVF4000,Flat, nprobe 8-16 (calibrated:
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

    def search(self, queries: torch.Tensor, heads: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest stored keys of each query (n, d) in its head's index: one search per head
        for all of that head's queries. Returns indices (n, k), -1 where there are fewer than k."""
        n = queries.size(0)
        found = torch.full((n, k), -1, dtype=torch.long, device=queries.device)
        q32 = queries.detach().float()
        kk = min(k, self.n_entries)
        for h in heads.unique().tolist():
            rows = (heads == h).nonzero(as_tuple=True)[0]
            if self.kind == 'faiss':
                _, I = self.heads[h].search(np.ascontiguousarray(q32[rows].cpu().numpy()), kk)
                found[rows, :kk] = torch.from_numpy(I).to(found.device)
            else:
                qh = q32[rows]
                dist = qh.pow(2).sum(-1, keepdim=True) - 2 * qh @ self.keys[h].T + self.key_sqnorms[h]
                found[rows, :kk] = dist.topk(kk, dim=-1, largest=False).indices
        return found


class LayerMemory:
    """One layer's memory in use: its stored keys/values (H_kv, N, d), one per key/value head,
    their search index, its k and the retrieval settings. Made by Memory.retrieving_layers.

    Token-heads are (b, h, j) with h a query head; query head h reads key/value head
    g = h // (H / H_kv) (grouped-query attention, METHOD.md section 8; GPT-2 has H_kv = H).
    memory_keys: the form the stored keys are in, which the attention gives q and k in:
    'unrotated' (before RoPE) or 'rotated' (as attention sees them)."""

    def __init__(self, keys, values, index, k, settings, memory_keys='unrotated'):
        self.keys, self.values, self.index = keys, values, index
        self.k = k                  # neighbours per selected token-head
        self.settings = settings    # RetrievalSettings
        self.memory_keys = memory_keys
        # for inspection, from the latest call (reset by every call): the selected tokens-heads
        # (B, H, T), and for those looked up, their (b, h, j), the selecting attention weight
        # (n,), the stored rows found (n, k; -1: none) and their squared L2 distances (n, k),
        # the candidates' weights (n, k, or n, k+1 with the token's own first unless
        # resid_only) and the size of the value change |v' - v| (n,); None when nothing was
        # looked up (retrieval_trace.py prints them)
        self.last_selection = None
        self.last_retrieval = None
        self.group = 1  # query heads per key/value head, as the latest call saw them

    def select(self, att: torch.Tensor) -> torch.Tensor:
        """Step 1: which tokens-heads (b, h, j) look up the memory, from the last query row."""
        s = att[:, :, -1, :].clone()  # (B, H, T)
        T = s.size(-1)
        BF, MF = self.settings.bookkeeping_frac, self.settings.mem_frac
        if BF != 0:
            s[:, :, 0] = s[:, :, 0].masked_fill(s[:, :, 0] <= BF, 0)
        if MF != 0:
            s = s.masked_fill(s < 1 / (MF * T), 0)
        else:
            s[:, :, 1:] = 0
        return s != 0

    def search(self, queries: torch.Tensor, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: the k nearest stored keys (squared L2) of each query (n, d) in its head's
        memory. Returns indices (n, k), -1 where the memory holds fewer than k entries."""
        return self.index.search(queries, heads, self.k)

    def memory_values(self, query_j: torch.Tensor, key_j: torch.Tensor, value_j: torch.Tensor,
                      heads: torch.Tensor) -> torch.Tensor:
        """Steps 2-6 for n selected token-heads: each one's own query (n, d), the key and value
        (n, d) of its key/value head, and that key/value head (n,), whose memory is searched.
        Returns the new values v' (n, d). A token-head's v' depends on nothing but these."""
        d = key_j.size(-1)
        # 2. neighbours of the token's own key
        found = self.search(key_j, heads)  # (n, k), -1: none
        valid = found >= 0
        nbr = found.clamp(min=0)
        cand_k = self.keys[heads[:, None], nbr].to(key_j.dtype)  # (n, k, d)
        cand_v = self.values[heads[:, None], nbr].to(value_j.dtype)
        # 3. unless resid_only, the token's own (key, value) is one more candidate
        if not self.settings.resid_only:
            cand_k = torch.cat((key_j[:, None], cand_k), dim=1)
            cand_v = torch.cat((value_j[:, None], cand_v), dim=1)
            valid = torch.cat((torch.ones_like(valid[:, :1]), valid), dim=1)
        # 4. w = softmax(TS * (q_j . key) / sqrt(d)) over the candidates, with token j's own query
        scores = (cand_k @ query_j[:, :, None]).squeeze(-1) * (1.0 / math.sqrt(d))
        scores = (scores * self.settings.knn_softmax_influence).masked_fill(~valid, float('-inf'))
        w = F.softmax(scores, dim=-1)
        distances = (self.keys[heads[:, None], nbr].float() - key_j.float()[:, None]).pow(2).sum(-1)
        self.last_retrieval = dict(neighbours=found, distances=distances.masked_fill(found < 0, float('nan')), weights=w)
        # 5. memory vector
        m = (w[:, :, None] * cand_v).sum(dim=1)
        # 6. new value
        r = self.settings.resid_frac
        return (1 - r) * m + r * value_j if r != 0 else m

    @torch.no_grad()
    def update_values(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Exact mode. q: (B, H, T, d); k, v: (B, H_kv, T, d); att: (B, H, T_q, T) softmaxed
        causal attention, of which the selection reads the last row. Returns v' (B, H, T, d),
        per query head: v of its key/value head with its selected token-heads' values replaced."""
        group = self.group = q.size(1) // k.size(1)
        selected = self.select(att)
        self.last_selection, self.last_retrieval = selected, None
        b, h, j = selected.nonzero(as_tuple=True)
        v = expand_kv(v, group)
        if b.numel() == 0:
            return v
        v = v.clone()
        g = h // group
        new = self.memory_values(q[b, h, j], k[b, g, j], v[b, h, j], g)
        self.last_retrieval.update(b=b, h=h, j=j, attention=att[b, h, -1, j],
                                   value_change=(new.float() - v[b, h, j].float()).norm(dim=-1))
        v[b, h, j] = new
        return v  # 7. the caller finishes attention: y = att @ v'

    @torch.no_grad()
    def cached_values(self, q, k, v, att, v_mem, done):
        """Cached mode (opt-in, not the method's exact decoding). q, k, v of all positions
        (B, H, T, d); att (B, H, T_new, T), the rows of the new positions. The selection is
        made from the newest row as in exact mode, but past positions keep the states they
        had: only this layer's values are swapped. Each token-head's v' is computed once and
        kept in v_mem (B, H, T, d), with `done` (B, H, T) marking which; both are updated in
        place; q and v_mem are per query head, k and v per key/value head. Returns the values
        to attend with, per query head."""
        group = self.group = q.size(1) // k.size(1)
        selected = self.select(att)
        self.last_selection, self.last_retrieval = selected, None
        b, h, j = (selected & ~done).nonzero(as_tuple=True)
        if b.numel():
            g = h // group
            v_mem[b, h, j] = self.memory_values(q[b, h, j], k[b, g, j], v[b, g, j], g)
            self.last_retrieval.update(b=b, h=h, j=j, attention=att[b, h, -1, j],
                                       value_change=(v_mem[b, h, j].float() - v[b, g, j].float()).norm(dim=-1))
            done[b, h, j] = True
        return torch.where(selected[..., None], v_mem, expand_kv(v, group))


# -----------------------------------------------------------------------------
# what was stored

def memory_token_windows(ids: list[int], n_bookkeeping: int, block_size: int) -> list[list[int]]:
    """Split a tokenized memory (its first n_bookkeeping ids are the bookkeeping token) into
    windows of at most block_size tokens, each starting with its own bookkeeping token."""
    prefix, body = ids[:n_bookkeeping], ids[n_bookkeeping:]
    width = block_size - len(prefix)
    if width <= 0:
        raise UserError(f"the bookkeeping token takes {len(prefix)} tokens, leaving no room in block_size {block_size}")
    return [prefix + body[i:i + width] for i in range(0, len(body), width)]


@torch.no_grad()
def window_rows(model, windows: list[list[int]], layers: list[int], n_skip: int, memory_keys: str, batch_size: int):
    """The plain model over memory windows (METHOD.md section 1), consecutive windows of one
    length as one batch. Yields (windows done, {layer: (keys, values)}), each (H_kv, rows, d)
    on the CPU, one row per stored token in order (the first n_skip of each window dropped)."""
    device = next(model.parameters()).device
    i = 0
    while i < len(windows):
        group = [windows[i]]
        while i + len(group) < len(windows) and len(group) < batch_size and \
                len(windows[i + len(group)]) == len(group[0]):
            group.append(windows[i + len(group)])
        x = torch.tensor(group, dtype=torch.long, device=device)
        _, kv, _ = model.run_blocks(model.embed(x), 0, max(layers) + 1, use_memory=False)
        rows = {}
        for l in layers:
            k, v = kv[l]  # (B, H_kv, T, d): the attention block's own k (before RoPE) and v
            if memory_keys == 'rotated':  # as attention sees them, positions from the window's start
                k = model.rope(k, 0)
            # one row per token, in order: (B, H, T', d) -> (H, B*T', d)
            rows[l] = tuple(t[:, :, n_skip:].transpose(0, 1).reshape(t.size(1), -1, t.size(-1)).cpu() for t in (k, v))
        i += len(group)
        yield len(group), rows


class Memory:
    """Stored keys and values of the memory layers, with their provenance."""

    def __init__(self, keys, values, meta):
        self.keys, self.values = keys, values  # {layer: (H, N, d)}
        self.meta = meta
        self._in_use = {}  # (layer, device, search) -> (keys, values, KNNIndex) there: built once
        self.store = None  # (directory, tensor file checksum) when loaded from one: its indexes are saved there

    @property
    def memory_keys(self) -> str:
        return self.meta.get('memory_keys', 'unrotated')  # memories before format 2: GPT-2, no RoPE

    @property
    def stored_layers(self) -> list[int]:
        return sorted(self.keys)

    def stored_token_ids(self) -> list[int] | None:
        """The token id of each stored row, in order (None for an imported memory without its text)."""
        windows, n_skip = self.meta.get('token_windows'), self.meta.get('remove_bookkeeping_token_mem_size')
        if windows is None or n_skip is None:
            return None
        return [t for w in windows for t in w[n_skip:]]

    def num_entries(self) -> int:
        return next(iter(self.keys.values())).size(1) if self.keys else 0

    def row_origins(self) -> list[tuple[str, int]]:
        """(document, position among that document's stored tokens) of every stored row; a
        memory built from one text is one document, 'memory text'."""
        docs = self.meta.get('documents') or [dict(name='memory text', first_row=0, rows=self.num_entries())]
        return [(d['name'], i) for d in docs for i in range(d['rows'])]

    def identity(self) -> str:
        """A digest of what the memory holds: every stored layer's keys and values and the form
        of its keys. Records name it, so a result can be traced to the memory that made it;
        two memories with one identity retrieve the same rows. Cached (stored tensors are
        never changed in place)."""
        if getattr(self, '_identity', None) is None:
            h = hashlib.sha256(self.memory_keys.encode())
            for layer in self.stored_layers:
                h.update(f"layer {layer} {tuple(self.keys[layer].shape)} {self.values[layer].dtype}".encode())
                for t in (self.keys[layer], self.values[layer]):
                    for head in t:  # head by head: a memory-mapped store is read, not copied whole
                        h.update(np.ascontiguousarray(head.numpy()).data)
            self._identity = h.hexdigest()[:16]
        return self._identity

    def describe(self, store: str | None = None) -> dict:
        """What a record says of this memory: its identity, where it came from, its shape."""
        return dict(identity=self.identity(), store=store, source=self.meta.get('source'),
                    layers=self.stored_layers, num_entries=self.num_entries(), memory_keys=self.memory_keys,
                    bookkeeping_token=self.meta.get('bookkeeping_token'),
                    remove_bookkeeping_token_mem_size=self.meta.get('remove_bookkeeping_token_mem_size'),
                    text_sha256=hashlib.sha256(self.meta['text'].encode()).hexdigest()[:16]
                    if self.meta.get('text') else None)

    # --- building ----------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(cls, model, enc, text: str, layers: list[int] | None = None, bookkeeping_token: str = '\n',
              remove_bookkeeping_token_mem_size: int | None = None, progress: bool = False, batch_size: int = 8,
              memory_keys: str = 'unrotated') -> Memory:
        """METHOD.md section 1. `text` is tokenized as given: it starts with its bookkeeping token
        (run.memory_text puts it in front of a text read from a file). The first
        remove_bookkeeping_token_mem_size tokens (default: the leading tokens of the bookkeeping
        token alone, a BOS token included where the tokenizer adds one) are not stored. The
        plain model runs over the tokens, retrieval off, in windows of at most block_size
        tokens. memory_keys: store keys before RoPE ('unrotated') or as attention sees them
        at their window position ('rotated'); see METHOD.md section 8."""
        bk_ids = encode(enc, bookkeeping_token) if bookkeeping_token else []
        n_skip = len(bk_ids) if remove_bookkeeping_token_mem_size is None else remove_bookkeeping_token_mem_size
        return cls.build_from_ids(model, encode(enc, text), layers, n_skip, progress=progress, batch_size=batch_size,
                                  text=text, bookkeeping_token=bookkeeping_token, memory_keys=memory_keys)

    @classmethod
    @torch.no_grad()
    def build_from_ids(cls, model, ids: list[int], layers: list[int] | None = None, n_skip: int = 1,
                       progress: bool = False, batch_size: int = 8, text: str | None = None,
                       bookkeeping_token: str | None = None, memory_keys: str = 'unrotated') -> Memory:
        """Build from token ids whose first n_skip ids are the bookkeeping token (not stored)."""
        cfg = model.config
        if memory_keys not in MEMORY_KEYS:
            raise UserError(f"memory_keys={memory_keys!r} must be one of {', '.join(map(repr, MEMORY_KEYS))}")
        if memory_keys == 'rotated' and model.rope is None:
            raise UserError(f"memory_keys='rotated' needs a model with rotary position embeddings; "
                            f"{model.name} ({cfg.arch}) has none: use 'unrotated'")
        layers = list(range(cfg.n_layer)) if layers is None else sorted(set(layers))
        bad = [l for l in layers if not 0 <= l < cfg.n_layer]
        if bad or not layers:
            raise UserError(f"layers {bad or layers} are not layers of this {cfg.n_layer}-layer model; "
                            f"use indices 0..{cfg.n_layer - 1}")
        if n_skip < 0:
            raise UserError(f"remove_bookkeeping_token_mem_size={n_skip} must be >= 0")
        if len(ids) <= n_skip:
            raise UserError(f"the memory text has {len(ids)} tokens, nothing left to store after removing "
                            f"{n_skip} bookkeeping token(s); give it some text")
        windows = memory_token_windows(list(ids), n_skip, cfg.block_size)
        keys = {l: [] for l in layers}
        values = {l: [] for l in layers}
        from tqdm import tqdm
        bar = tqdm(total=len(windows), desc='building memory', unit='window', disable=not progress)
        for n, rows in window_rows(model, windows, layers, n_skip, memory_keys, batch_size):
            for l, (k, v) in rows.items():
                keys[l].append(k)
                values[l].append(v)
            bar.update(n)
        bar.close()
        meta = dict(model=model_identity(model), text=text, token_windows=windows,
                    bookkeeping_token=bookkeeping_token, remove_bookkeeping_token_mem_size=n_skip,
                    memory_keys=memory_keys, retrieval_during_build=False, source='built')
        return cls({l: torch.cat(keys[l], 1).float().contiguous() for l in layers},
                   {l: torch.cat(values[l], 1).float().contiguous() for l in layers}, meta)

    # --- using -------------------------------------------------------------------

    @property
    def knn_index(self) -> str:
        """The memory's own index choice (build_memory.py --knn_index); 'flat' before it had one."""
        return self.meta.get('knn_index') or 'flat'

    def retrieving_layers(self, settings: RetrievalSettings, device='cpu', search: str | None = None,
                          knn_index: str | None = None, params: dict | None = None) -> dict[int, LayerMemory]:
        """{layer: LayerMemory} for the layers that retrieve under `settings` (a RetrievalSettings),
        to give to model.attach_memory. The memory itself is not changed: each layer's keys,
        values and search index on a device are made once and shared by every settings value.
        search: 'faiss' or 'torch' (exact); None = FAISS on the CPU, torch on CUDA. knn_index:
        the index to search (None: the memory's own); params: its search parameters."""
        settings.check_layers(self.meta['model']['n_layer'])
        missing = [i for i in settings.layers if i not in self.keys]
        if missing:
            raise UserError(f"knn_num asks for layers {missing} but the memory holds layers {self.stored_layers}; "
                            f"rebuild it with --layers={sorted(set(missing) | set(self.stored_layers))} or set those k to 0")
        check_search(search)
        search = default_search(device) if search is None else search
        knn_index = knn_index or self.knn_index
        params = check_index_params(params)
        layers = {}
        for i in settings.layers:
            key = (i, str(device), search, knn_index, tuple(sorted(params.items())))
            if key not in self._in_use:
                keys, values = self.keys[i].to(device), self.values[i].to(device)
                self._in_use[key] = (keys, values, self.search_index(i, keys, search, knn_index, params))
            keys, values, index = self._in_use[key]
            # a k beyond the memory's size finds nothing more: those neighbours take no part anyway
            layers[i] = LayerMemory(keys, values, index, min(settings.knn_num[i], keys.size(1)), settings,
                                    self.memory_keys)
        return layers

    def search_index(self, layer, keys, search, knn_index, params) -> KNNIndex:
        """The KNNIndex of one layer's keys. An approximate FAISS index of a memory loaded from a
        directory is trained once per memory, not once per load: it is read from the directory
        (index-*.safetensors, named by the tensors' checksum, the layer and the FAISS factory
        string) or, built, written there, with its calibrated search parameters (an index file
        saved without them gets them on load). An unreadable index file is built again."""
        factory = index_factory(knn_index, keys.size(1), keys.size(2))
        if search != 'faiss' or factory == 'Flat' or self.store is None:
            return KNNIndex(keys, search, knn_index, params)
        directory, checksum = self.store
        file = os.path.join(directory, index_file_name(checksum, layer, factory))
        index = None
        if os.path.isfile(file):
            from safetensors import SafetensorError, safe_open
            try:
                with safe_open(file, 'np') as f:
                    saved = {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
                index = KNNIndex(keys, search, knn_index, params, saved=saved)
                if not index.calibrated_now:
                    return index
                # calibrated now (the file was saved without it): saved again with it, below
            except (SafetensorError, KeyError, ValueError, RuntimeError, OSError) as e:
                warnings.warn(f"{file} is unreadable ({faiss_message(e)}); building the index again", stacklevel=2)
        index = index or KNNIndex(keys, search, knn_index, params)
        from safetensors.numpy import save
        try:
            write_whole(file, save(*index.serialized()))
        except UserError as e:  # a read-only memory is still usable: its index is built on every load
            warnings.warn(f"{e}; the search index will be built again on the next load", stacklevel=2)
        return index

    def index_layers(self) -> int:
        """Make every stored layer's search index now (FAISS on the CPU), so that a memory
        directory's approximate index is trained and saved at build time, not on first use.
        Returns how many indexes were trained here or read from the directory."""
        for layer in self.stored_layers:
            self.search_index(layer, self.keys[layer], 'faiss', self.knn_index, {})
        return len(self.stored_layers)

    def check_model(self, model) -> None:
        """Refuse a memory made by another model or with other shapes."""
        mine, theirs = dict(self.meta['model']), model_identity(model)
        mine.setdefault('arch', 'gpt2')  # manifests before format 2: GPT-2
        mine.setdefault('n_kv_head', mine['n_head'])
        for key in ('arch', 'n_layer', 'n_head', 'n_kv_head', 'head_size'):
            if mine[key] != theirs[key]:
                raise UserError(f"memory was made with {key}={mine[key]} ({mine['name']}), this model has "
                                f"{key}={theirs[key]} ({theirs['name']}); rebuild it with build_memory.py --init_from={theirs['name']}")
        if mine.get('fingerprint'):
            scheme = mine.get('fingerprint_scheme', 'sampled-v1')
            if scheme == FINGERPRINT_SCHEME:
                theirs_fp = theirs['fingerprint']
            elif scheme == 'sampled-v1':
                theirs_fp = model.fingerprint_sampled()
                warnings.warn("this memory was saved before fingerprints covered every weight: it is checked against "
                              "one weight in ~4096 only; save it again (or rebuild it) for the full check", stacklevel=2)
            else:
                raise UserError(f"memory's fingerprint scheme {scheme!r} is unknown to this code; rebuild the memory")
            if mine['fingerprint'] != theirs_fp:
                raise UserError(f"memory was made by model {mine['name']} (weights {mine['fingerprint']}), not by "
                                f"{theirs['name']} (weights {theirs_fp}); rebuild it with "
                                f"build_memory.py --init_from={theirs['name']}")
        for l in self.keys:
            if self.keys[l].shape != (theirs['n_kv_head'], self.keys[l].size(1), theirs['head_size']) \
                    or self.values[l].shape != self.keys[l].shape:
                raise UserError(f"memory layer {l} holds keys {tuple(self.keys[l].shape)} and values "
                                f"{tuple(self.values[l].shape)}; this model needs ({theirs['n_kv_head']}, N, "
                                f"{theirs['head_size']}) (key/value heads, N, head size)")

    # --- saving and loading --------------------------------------------------------

    def save(self, path: str, dtype: str | None = None) -> str:
        """Write the memory as a directory: memory.json (the manifest) and the tensors in
        memory-<checksum>.safetensors, which the manifest names (see commit: the path always
        holds a complete memory). dtype: 'float32' or 'float16'; None = as the tensors are."""
        from safetensors.torch import save_file
        dtype = dtype or str(next(iter(self.keys.values())).dtype).removeprefix('torch.')
        if dtype not in STORE_DTYPES:
            raise UserError(f"store_dtype={dtype!r} must be one of {', '.join(STORE_DTYPES)}")

        def write(tmp):
            save_file({f'layer{l}.{kind}': t[l].to(STORE_DTYPES[dtype]).contiguous()
                       for l in self.stored_layers for kind, t in (('keys', self.keys), ('values', self.values))}, tmp)
        return commit(path, write, self.manifest_fields(dtype, self.num_entries()))

    def manifest_fields(self, dtype: str, num_entries: int) -> dict:
        """The manifest of this memory's meta, as saved with `num_entries` rows in `dtype`."""
        model, d = self.meta['model'], self.meta['model']['head_size']
        return dict(format=FORMAT, format_version=FORMAT_VERSION,
                    **{k: v for k, v in self.meta.items() if k not in ('knn_index', 'index', 'layers')},
                    layers=sorted(self.keys) if self.keys else self.meta['layers'], n_head=model['n_head'],
                    n_kv_head=model.get('n_kv_head', model['n_head']), head_size=d, num_entries=num_entries,
                    knn_index=self.knn_index, dtype=dtype, index=index_description(self.knn_index, num_entries, d))

    @classmethod
    def load(cls, path: str, model=None, enc=None, mmap: bool = False) -> Memory:
        """Load a memory directory: ours (memory.json) or the reference code's layout.
        With a model, refuse a memory that model did not make. mmap: the values stay on disk,
        memory-mapped, and only the rows retrieved are read (the keys are loaded: the search
        index holds them anyway)."""
        if not os.path.isdir(path):
            raise UserError(f"memory directory {path} does not exist; build one with build_memory.py")
        if os.path.isfile(os.path.join(path, MANIFEST)):
            memory = cls._load_ours(path, mmap=mmap)
        elif os.path.isdir(os.path.join(path, 'keyStore')):
            if model is None or enc is None:
                raise UserError("importing a reference-layout memory needs the model and tokenizer")
            memory = import_reference(path, model, enc)
        else:
            raise UserError(f"{path} holds neither {MANIFEST} nor a reference keyStore/ folder; "
                            f"it is not a memory (build one with build_memory.py)")
        if model is not None:
            memory.check_model(model)
        return memory

    @classmethod
    def _load_ours(cls, path, tries=3, mmap=False):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        rebuild = "rebuild the memory with build_memory.py"
        manifest = read_manifest(path)
        tensor_file, expected = next(iter(manifest['tensors'].items()))
        tensor_path = os.path.join(path, tensor_file)
        if not os.path.isfile(tensor_path):
            if tries > 1 and read_manifest(path) != manifest:  # a save replaced the memory meanwhile
                return cls._load_ours(path, tries - 1, mmap)
            raise UserError(f"{path} lacks {tensor_file}; the memory is incomplete, {rebuild}")
        if sha256_file(tensor_path) != expected:
            raise UserError(f"{tensor_path} does not match the checksum in {MANIFEST} (truncated or altered); {rebuild}")
        try:
            if mmap:
                from safetensors import safe_open
                with safe_open(tensor_path, framework='pt') as f:
                    keys = {int(l): f.get_tensor(f'layer{l}.keys') for l in manifest['layers']}
                values = {int(l): mapped_tensor(tensor_path, f'layer{l}.values') for l in manifest['layers']}
            else:
                tensors = load_file(tensor_path)
                keys = {int(l): tensors[f'layer{l}.keys'] for l in manifest['layers']}
                values = {int(l): tensors[f'layer{l}.values'] for l in manifest['layers']}
        except (SafetensorError, KeyError, ValueError) as e:
            raise UserError(f"{tensor_path} is unreadable or incomplete ({e}); {rebuild}") from None
        for l in keys:
            check_stored(keys[l], values[l], f"{tensor_path} layer {l}", rebuild)
        meta = {k: manifest[k] for k in ('model', 'text', 'token_windows', 'bookkeeping_token',
                                         'remove_bookkeeping_token_mem_size', 'memory_keys', 'retrieval_during_build',
                                         'source', 'knn_index', 'documents')
                if k in manifest}
        memory = cls(keys, values, meta)
        memory.store = (os.path.abspath(path), expected)
        return memory


def index_description(knn_index: str, n: int, d: int) -> str:
    """The manifest's words for its index."""
    return (f"{knn_index} (FAISS {index_factory(knn_index, n, d)}), built from the keys when first used and, if "
            f"approximate, saved beside them (index-*.safetensors)")


def record_knn_index(path: str, knn_index: str, n: int, d: int) -> None:
    """Give the memory directory at path (n stored keys of size d per head) another index
    choice: only its manifest changes (the tensors, and the indexes saved for them, stay)."""
    from filelock import FileLock
    path = os.path.abspath(path)
    try:
        with FileLock(os.path.join(path, LOCK)):
            manifest = read_manifest(path)
            manifest.update(knn_index=knn_index, index=index_description(knn_index, n, d))
            write_whole(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1, ensure_ascii=False))
    except OSError as e:
        raise cannot_write(path, e) from None


def read_manifest(path: str) -> dict:
    """memory.json, its structure checked: anything else is a one-line error."""
    f = os.path.join(path, MANIFEST)
    bad = f"{f} is corrupted ({{}}); rebuild the memory with build_memory.py"
    try:
        with open(f, encoding='utf-8') as fh:
            manifest = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(bad.format(e)) from None
    if not isinstance(manifest, dict):
        raise UserError(bad.format(f"it holds a {type(manifest).__name__}, not an object"))
    version = manifest.get('format_version')
    if manifest.get('format') != FORMAT or version not in READABLE_VERSIONS:
        raise UserError(f"{f} is format {manifest.get('format')} v{version}, this code reads {FORMAT} "
                        f"v{', v'.join(map(str, READABLE_VERSIONS))}; rebuild the memory with build_memory.py")
    model, layers, tensors = manifest.get('model'), manifest.get('layers'), manifest.get('tensors')
    if not isinstance(model, dict) or not all(isinstance(model.get(k), int) for k in ('n_layer', 'n_head', 'head_size')):
        raise UserError(bad.format("its 'model' lacks n_layer, n_head or head_size"))
    if not isinstance(layers, list) or not layers or not all(isinstance(l, int) and not isinstance(l, bool)
                                                              for l in layers):
        raise UserError(bad.format("its 'layers' is not a list of layer indices"))
    if not isinstance(tensors, dict) or len(tensors) != 1 or not all(
            isinstance(k, str) and is_tensor_file(k) and isinstance(v, str) for k, v in tensors.items()):
        raise UserError(bad.format("its 'tensors' does not name one tensor file with its checksum"))
    return manifest


def commit(path: str, write_tensors, manifest: dict) -> str:
    """Make `path` a memory directory holding the tensors write_tensors(file) writes and this
    manifest, replacing any memory there.

    The path always holds a complete memory, the old one or the new one: the new tensors are
    written under their own name first, then the manifest is replaced in one rename (the
    switch), then the old tensors are removed. A save killed at any point leaves the old
    memory loadable (and perhaps a temporary or unreferenced file, which the next save
    removes). Saves to one path are serialised by a lock file, memory.lock. Only this code's
    own files are ever removed."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not (os.path.isdir(path) and (
            os.path.isfile(os.path.join(path, MANIFEST)) or all(is_own_file(f) for f in os.listdir(path)))):
        raise UserError(f"{path} exists and is not a memory directory; choose another mem_store")
    make_dirs(path)
    from filelock import FileLock
    try:
        with FileLock(os.path.join(path, LOCK)):
            for f in os.listdir(path):  # left by a save that was killed
                if is_temporary(f):
                    os.remove(os.path.join(path, f))
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix='.safetensors', dir=path)
            os.close(fd)
            write_tensors(tmp)
            checksum = sha256_file(tmp)
            name = f"memory-{checksum[:16]}.safetensors"
            os.chmod(tmp, umask_mode())
            os.replace(tmp, os.path.join(path, name))
            write_whole(os.path.join(path, MANIFEST),
                        json.dumps(dict(manifest, tensors={name: checksum}), indent=1, ensure_ascii=False))
            for f in os.listdir(path):  # the tensors of the memory this one replaced, and their indexes
                if (is_tensor_file(f) and f != name) or (is_index_file(f) and
                                                         not f.startswith(f"{INDEX_PREFIX}{checksum[:16]}-")):
                    os.remove(os.path.join(path, f))
    except OSError as e:
        raise cannot_write(path, e) from None
    return path


def check_stored(keys, values, where, fix):
    """Stored keys and values must be (H, N, d) alike and finite (checked head by head, so a
    memory-mapped store is read once, not held)."""
    if keys.dim() != 3 or keys.shape != values.shape:
        raise UserError(f"{where} holds keys {tuple(keys.shape)} and values {tuple(values.shape)}; "
                        f"they must be (heads, N, head_size) alike; {fix}")
    if not all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in zip(keys, values)):
        raise UserError(f"{where} holds NaN or infinite values; {fix}")


def mapped_tensor(path, name):
    """A read-only tensor memory-mapped from a safetensors file: its header (8 bytes of length,
    then JSON: dtype, shape, data_offsets) says where the tensor's bytes lie."""
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(n))
    info = header[name]
    dtype = {'F32': np.float32, 'F16': np.float16}.get(info['dtype'])
    if dtype is None:
        raise ValueError(f"{name} is stored as {info['dtype']}; memory-mapping reads F32 and F16")
    start, end = info['data_offsets']
    if (end - start) != int(np.prod(info['shape'])) * np.dtype(dtype).itemsize:
        raise ValueError(f"{name}'s data_offsets do not match its shape")
    array = np.memmap(path, dtype=dtype, mode='r', offset=8 + n + start, shape=tuple(info['shape']))
    with warnings.catch_warnings():  # read-only by design: the memory never writes its values
        warnings.simplefilter('ignore', UserWarning)
        return torch.from_numpy(array)


def is_tensor_file(name):
    """A memory's tensor file: memory-<checksum>.safetensors (memory.safetensors before format 2)."""
    return name == 'memory.safetensors' or (len(name) == 35 and name.startswith('memory-') and
                                            name.endswith('.safetensors') and all(c in '0123456789abcdef' for c in name[7:23]))


INDEX_PREFIX = 'index-'


def index_file_name(checksum: str, layer: int, factory: str) -> str:
    """index-<tensors' checksum>-<layer>-<factory's digest>.safetensors: one layer's saved FAISS
    indexes, one per head, valid beside the tensor file with that checksum only."""
    return f"{INDEX_PREFIX}{checksum[:16]}-{layer}-{hashlib.sha256(factory.encode()).hexdigest()[:8]}.safetensors"


def is_index_file(name):
    return name.startswith(INDEX_PREFIX) and name.endswith('.safetensors')


def is_temporary(name):
    """A save's temporary file: the tensors' (.tmp-*), the manifest's or an index's
    (.memory.json.tmp-*, .index-*.tmp-*: files.write_whole)."""
    return name.startswith(TMP_PREFIX) or name.startswith(f'.{MANIFEST}.tmp-') or \
        (name.startswith(f'.{INDEX_PREFIX}') and '.tmp-' in name)


def is_own_file(name):
    return name in (MANIFEST, LOCK) or is_temporary(name) or is_tensor_file(name) or is_index_file(name) or \
        name.startswith(SPOOL_PREFIX)


def import_reference(path: str, model, enc) -> Memory:
    """Read the reference code's saved layout (METHOD.md section 5): keyStore/<layer>/<head>.pt
    and valueStore/<layer>/<head>.pt, row 0 a sentinel. Only tensors are read
    (torch.load with weights_only=True); the .faiss files are not needed, since an exact
    flat index is rebuilt from the keys."""
    cfg = model.config
    if cfg.arch != 'gpt2':
        raise UserError(f"{path} is in the reference code's layout, which holds GPT-2 memories; "
                        f"this model is {cfg.arch}: build its memory with build_memory.py")
    head_size = cfg.head_dim
    layer_dirs = sorted(int(n) for n in os.listdir(os.path.join(path, 'keyStore')) if n.isdigit())
    if not layer_dirs:
        raise UserError(f"{path}/keyStore holds no layer folders; it is not a reference memory")
    keys, values = {}, {}
    for l in layer_dirs:
        if l >= cfg.n_layer:
            raise UserError(f"{path} has a memory for layer {l}, this model has {cfg.n_layer} layers; "
                            f"it was made by another model")
        for store in ('keyStore', 'valueStore'):
            folder = os.path.join(path, store, str(l))
            heads = sorted(f for f in os.listdir(folder) if f.endswith('.pt')) if os.path.isdir(folder) else []
            if heads != sorted(f'{h}.pt' for h in range(cfg.n_head)):
                raise UserError(f"{folder} holds {len(heads)} head files, this model has {cfg.n_head} heads "
                                f"(0.pt .. {cfg.n_head - 1}.pt); the memory was made by another model")
        ks, vs = [], []
        for h in range(cfg.n_head):
            pair = []
            for store in ('keyStore', 'valueStore'):
                f = os.path.join(path, store, str(l), f'{h}.pt')
                try:
                    t = torch.load(f, map_location='cpu', weights_only=True)
                except Exception as e:
                    raise UserError(f"{f} is not a tensor file torch can read safely ({type(e).__name__}); "
                                    f"the memory is corrupted") from None
                if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.size(1) != head_size or t.size(0) < 2:
                    raise UserError(f"{f} holds {getattr(t, 'shape', type(t).__name__)}, expected (N+1, {head_size}); "
                                    f"it was made by another model")
                pair.append(t[1:].float())  # drop the sentinel row
            if pair[0].shape != pair[1].shape:
                raise UserError(f"{path} layer {l} head {h}: {pair[0].size(0)} stored keys but {pair[1].size(0)} "
                                f"values; the memory is corrupted")
            ks.append(pair[0])
            vs.append(pair[1])
        if len({k.size(0) for k in ks}) > 1:
            raise UserError(f"{path} layer {l}: its heads store different numbers of tokens "
                            f"({sorted({k.size(0) for k in ks})}); the memory is corrupted")
        keys[l], values[l] = torch.stack(ks), torch.stack(vs)
        if keys[l].size(1) != keys[min(keys)].size(1):
            raise UserError(f"{path}: layer {l} stores {keys[l].size(1)} tokens, layer {min(keys)} "
                            f"{keys[min(keys)].size(1)}; the memory is corrupted")
        check_stored(keys[l], values[l], f"{path} layer {l}", "the memory is corrupted")
    name = os.path.basename(os.path.normpath(path))
    text_file = os.path.join(path, f'{name}.txt')
    text = open(text_file, encoding='utf-8').read() if os.path.isfile(text_file) else None
    ident = model_identity(model)
    ident['fingerprint'] = None  # the reference recorded none
    ids = encode(enc, text) if text else None
    n = next(iter(keys.values())).size(1)
    meta = dict(model=ident, text=text, token_windows=[ids] if ids else None, bookkeeping_token='\n',
                remove_bookkeeping_token_mem_size=len(ids) - n if ids and len(ids) >= n else None,
                retrieval_during_build=None, source=f'imported from reference layout {os.path.abspath(path)}')
    return Memory(keys, values, meta)


# -----------------------------------------------------------------------------
# large memories: many documents, built in a stream, appended to

SPOOL_PREFIX = '.build-'  # a streaming build's folder of rows, inside the memory directory


def read_documents(path: str) -> list[tuple[str, str]]:
    """(name, file) of each document: a text file is one; a folder's .txt files (sorted) are
    one each."""
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; give a text file or a folder of .txt files")
    if not os.path.isdir(path):
        raise UserError(f"{path} is neither a text file nor a folder of them")
    files = sorted(f for f in os.listdir(path) if f.endswith('.txt') and not f.startswith('.')
                   and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise UserError(f"folder {path} holds no .txt files; put one text file per document in it")
    return [(f, os.path.join(path, f)) for f in files]


def build_documents(model, enc, documents: list[tuple[str, str]], path: str, layers: list[int] | None = None,
                    bookkeeping_token: str = '\n', n_skip: int | None = None, memory_keys: str = 'unrotated',
                    batch_size: int = 8, dtype: str = 'float32', knn_index: str = 'flat', append: bool = False,
                    progress: bool = True) -> str:
    """METHOD.md section 1 over many documents, streamed to disk: each document gets the
    bookkeeping token in front and is windowed on its own, its windows go through the plain
    model in batches, and the rows are spooled to files per layer, kind and head inside the
    memory directory, so memory use stays at one batch. The memory is then written whole
    (commit): an interrupted build leaves the directory as it was. append=True adds the
    documents to the memory at path (same layers and bookkeeping), which stays readable until
    the new version is complete; the rows are those a build of all documents would store.
    The manifest records each document's name, first row, rows and tokens. Returns the path."""
    from tqdm import tqdm

    from run import read_text_file
    cfg = model.config
    base = Memory.load(path, model, enc, mmap=True) if append else None
    if base is not None:
        layers, bookkeeping_token = base.stored_layers, base.meta.get('bookkeeping_token')
        n_skip, memory_keys = base.meta.get('remove_bookkeeping_token_mem_size'), base.memory_keys
        knn_index = base.knn_index
        dtype = str(base.keys[layers[0]].dtype).removeprefix('torch.')
        if bookkeeping_token is None or n_skip is None:
            raise UserError(f"{path} does not record its bookkeeping token; rebuild it to append to it")
    layers = list(range(cfg.n_layer)) if layers is None else sorted(set(layers))
    if not layers or not all(0 <= l < cfg.n_layer for l in layers):
        raise UserError(f"layers {layers} are not layers of this {cfg.n_layer}-layer model")
    if dtype not in STORE_DTYPES:
        raise UserError(f"store_dtype={dtype!r} must be one of {', '.join(STORE_DTYPES)}")
    if memory_keys == 'rotated' and model.rope is None:
        raise UserError("memory_keys='rotated' needs a model with rotary position embeddings")
    n_skip = len(encode(enc, bookkeeping_token)) if n_skip is None and bookkeeping_token else (n_skip or 0)
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, MANIFEST)) and \
            not (os.path.isdir(path) and all(is_own_file(f) for f in os.listdir(path))):
        raise UserError(f"{path} exists and is not a memory directory; choose another mem_store")
    created = not os.path.exists(path)
    make_dirs(path)
    spool = tempfile.mkdtemp(prefix=SPOOL_PREFIX, dir=path)
    done = False
    H, d = cfg.n_kv_head, cfg.head_dim
    np_dtype = np.float16 if dtype == 'float16' else np.float32
    try:
        files = {(l, kind, h): open(os.path.join(spool, f"{l}.{kind}.{h}"), 'wb')
                 for l in layers for kind in ('keys', 'values') for h in range(H)}
        first = base.num_entries() if base is not None else 0
        rows, docs, windows_all = first, [], []
        bar = one_text = None
        # the bar's total (and so its time left) is estimated from the tokens per byte of the text read so far
        sizes = {file: os.path.getsize(file) for _, file in documents}
        total_bytes, read_bytes, read_tokens = sum(sizes.values()), 0, 0
        for name, file in documents:
            text = bookkeeping_token + read_text_file(file, 'memory')
            one_text = text if base is None and len(documents) == 1 else None  # a memory of one text keeps it
            ids = encode(enc, text)
            if bar is None:  # after the first document is read: a bad file's error comes alone
                bar = tqdm(total=None, desc='building memory', unit='tok', unit_scale=True, disable=not progress)
            windows = memory_token_windows(ids, n_skip, cfg.block_size)
            read_bytes += sizes[file]
            read_tokens += sum(len(w) for w in windows)
            bar.total = max(read_tokens, round(read_tokens * total_bytes / max(read_bytes, 1)))
            bar.refresh()
            start, done = rows, 0
            for n, got in window_rows(model, windows, layers, n_skip, memory_keys, batch_size):
                for l, (k, v) in got.items():
                    for kind, t in (('keys', k), ('values', v)):
                        for h in range(H):
                            files[(l, kind, h)].write(t[h].numpy().astype(np_dtype).tobytes())
                rows += next(iter(got.values()))[0].size(1)
                bar.update(sum(len(w) for w in windows[done:done + n]))
                done += n
            docs.append(dict(name=name, first_row=start, rows=rows - start, tokens=len(ids)))
            windows_all += windows
        if bar is not None:
            bar.close()
        for f in files.values():
            f.close()
        if rows == first:
            raise UserError("the documents hold no tokens to store after the bookkeeping token; give them some text")

        def write(tmp):  # safetensors: 8 bytes of header length, the JSON header, then each tensor's bytes
            names = [(l, kind) for l in layers for kind in ('keys', 'values')]
            size = H * rows * d * np.dtype(np_dtype).itemsize
            header = {f'layer{l}.{kind}': dict(dtype='F16' if dtype == 'float16' else 'F32', shape=[H, rows, d],
                                               data_offsets=[i * size, (i + 1) * size])
                      for i, (l, kind) in enumerate(names)}
            text = json.dumps(header).encode()
            text += b' ' * (-len(text) % 8)
            with open(tmp, 'wb') as out:
                out.write(len(text).to_bytes(8, 'little'))
                out.write(text)
                for l, kind in names:
                    for h in range(H):
                        if base is not None:
                            old = (base.keys if kind == 'keys' else base.values)[l][h]
                            out.write(np.ascontiguousarray(old.numpy()).astype(np_dtype, copy=False).tobytes())
                        with open(os.path.join(spool, f"{l}.{kind}.{h}"), 'rb') as f:
                            shutil.copyfileobj(f, out, 1 << 24)
        if base is not None:
            old_docs = base.meta.get('documents') or [dict(name='memory text', first_row=0, rows=first,
                                                           tokens=sum(len(w) for w in base.meta['token_windows']))]
            docs, windows_all = old_docs + docs, base.meta['token_windows'] + windows_all
        meta = dict(model=model_identity(model), text=one_text, token_windows=windows_all,
                    bookkeeping_token=bookkeeping_token, remove_bookkeeping_token_mem_size=n_skip,
                    memory_keys=memory_keys, retrieval_during_build=False, source='built', documents=docs,
                    knn_index=knn_index, layers=layers)
        path = commit(path, write, Memory({}, {}, meta).manifest_fields(dtype, rows))
        done = True
        return path
    finally:
        for f in locals().get('files', {}).values():
            f.close()
        shutil.rmtree(spool, ignore_errors=True)
        if created and not done:  # a build that fails leaves no folder behind
            shutil.rmtree(path, ignore_errors=True)


# -----------------------------------------------------------------------------
# helpers

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


def model_identity(model) -> dict:
    cfg = model.config
    return dict(name=model.name, arch=cfg.arch, fingerprint=model.fingerprint(), fingerprint_scheme=FINGERPRINT_SCHEME,
                n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd,
                head_size=cfg.head_dim, vocab_size=cfg.vocab_size, block_size=cfg.block_size)
