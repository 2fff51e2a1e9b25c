"""
The persistent attention memory of docs/method.md: the method itself, next to its equations.

  RetrievalSettings  section 2's parameters (k per layer, MF, BF, TS, resid_only, r), checked
                     once when made, like GPTConfig for the model.
  LayerMemory        one layer's memory in use, called by that layer's attention
                     (transformer.attend): section 2's steps 1-7 as select, search,
                     memory_values, update_values (exact decoding) and cached_values (the
                     cached approximation); grouped-query attention and RoPE keys as in section 8.
  Retrieval          what a layer's latest call looked up, for inspection.
  Memory             what was stored: per memory layer, every key/value head's keys and values
                     (H_kv, N, d) and where they came from. It hands out LayerMemory objects for
                     a RetrievalSettings (retrieving_layers), making each layer's search index
                     (knn_index.py) once however many settings use it.

Building a memory (section 1) is build.py; saving and loading it as a directory is store.py.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
from torch.nn import functional as F

from configurator import UserError
from index_choice import index_factory
from knn_index import KNNIndex, SearchSettings
from retrieval_attention import AttentionMemory
from transformer import FINGERPRINT_SCHEME, expand_kv

MEMORY_KEYS = ('unrotated', 'rotated')  # the form keys are stored in on RoPE models (docs/method.md section 8)


# -----------------------------------------------------------------------------
# the method: docs/method.md sections 2 and 8

MEMORY_MODES = ('values', 'attention')
SELECTION_DEFAULTS = dict(mem_frac=0.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0, resid_only=False, resid_frac=0.0)
MAX_SETTING = 1e6  # MF, BF and TS above this overflow float32 scores (TS * q.k / sqrt(d))


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class RetrievalSettings:
    """The retrieval parameters of docs/method.md section 2, like GPTConfig for the model. Bad values
    are refused when the settings are made, with a one-line UserError."""
    knn_num: tuple                      # k per layer, one entry per layer; 0 = no memory in that layer
    mem_frac: float = 0.0               # MF
    bookkeeping_frac: float = 0.0       # BF
    knn_softmax_influence: float = 1.0  # TS
    resid_only: bool = False
    resid_frac: float = 0.0             # r
    memory_mode: str = 'values'         # 'values' (sections 2 and 8) or 'attention' (section 10)
    memory_sim_threshold: float | None = None  # attention mode: rows at or below this cosine get no weight

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
            if not _is_number(val) or not 0 <= val <= MAX_SETTING:
                raise UserError(f"{name}={val!r} must be a number from 0 to {MAX_SETTING:g} (the write-up's largest is "
                                f"1000; beyond, the candidates' scores overflow)")
            object.__setattr__(self, name, float(val))
        if not _is_number(self.resid_frac) or not 0 <= self.resid_frac <= 1:
            raise UserError(f"resid_frac={self.resid_frac!r} must be between 0 and 1")
        object.__setattr__(self, 'resid_frac', float(self.resid_frac))
        if not isinstance(self.resid_only, bool):
            raise UserError(f"resid_only={self.resid_only!r} must be True or False")
        if self.memory_mode not in MEMORY_MODES:
            raise UserError(f"memory_mode={self.memory_mode!r} must be 'values' (the write-up's) or 'attention' "
                            f"(retrieval attention, docs/method.md section 10)")
        t = self.memory_sim_threshold
        if t is not None and (self.memory_mode != 'attention' or not _is_number(t) or not -1 <= t < 1):
            raise UserError(f"memory_sim_threshold={t!r}: a cosine in [-1, 1), for memory_mode='attention' only")
        if self.memory_mode == 'attention':
            given = [f"{k}={getattr(self, k)!r}" for k, default in SELECTION_DEFAULTS.items() if getattr(self, k) != default]
            if given:
                raise UserError(f"{', '.join(given)}: the selection parameters of docs/method.md section 2 do not apply "
                                f"with memory_mode='attention' (every query retrieves); leave them at their defaults")

    @classmethod
    def from_config(cls, config: dict, n_layer: int | None = None) -> RetrievalSettings:
        """The settings a run config asks for (knn_num None = no memory), checked against a
        model of n_layer layers where it is known (a sweep makes its settings before its model)."""
        knn_num = config['knn_num'] if config['knn_num'] is not None else [0] * (n_layer or 0)
        settings = cls(knn_num, config['mem_frac'], config['bookkeeping_frac'], config['knn_softmax_influence'],
                       config['resid_only'], config['resid_frac'], config.get('memory_mode', 'values'),
                       config.get('memory_sim_threshold'))
        if n_layer is not None:
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
        """The settings as a dict; the mode fields only where not the default, so the records and
        sweep ids of the write-up's value mode are what they were before retrieval attention."""
        d = dict(asdict(self), knn_num=list(self.knn_num))
        if self.memory_mode == 'values':
            del d['memory_mode'], d['memory_sim_threshold']
        return d


@dataclass
class Retrieval:
    """What one memory layer's latest call looked up: n selected token-heads (b, h, j), h a
    query head, and for each the selecting attention weight, the stored rows found (-1 where
    none) and the candidates' weights (the token's own first unless resid_only). The squared L2
    distances of the rows found (NaN where none) and the size of the value change |v' - v| are
    worked out when first read: inspection reads them, decoding never does."""
    b: torch.Tensor             # (n,)
    h: torch.Tensor             # (n,)
    j: torch.Tensor             # (n,)
    attention: torch.Tensor     # (n,)
    neighbours: torch.Tensor    # (n, k)
    weights: torch.Tensor       # (n, k) with resid_only, else (n, k + 1)
    inputs: tuple               # (the layer's stored keys, each token-head's key/value head, key, v', v)

    @cached_property
    def distances(self) -> torch.Tensor:  # (n, k)
        stored_keys, kv_heads, key_j, _, _ = self.inputs
        stored = stored_keys[kv_heads[:, None], self.neighbours.clamp(min=0)].float()
        return (stored - key_j.float()[:, None]).pow(2).sum(-1).masked_fill(self.neighbours < 0, float('nan'))

    @cached_property
    def value_change(self) -> torch.Tensor:  # (n,)
        _, _, _, new, old = self.inputs
        return (new.float() - old.float()).norm(dim=-1)


class LayerMemory:
    """One layer's memory in use: its stored keys/values (H_kv, N, d), one per key/value head,
    their search index (knn_index.KNNIndex), its k and the retrieval settings. Made by
    Memory.retrieving_layers.

    Token-heads are (b, h, j) with h a query head; query head h reads key/value head
    g = h // (H / H_kv) (grouped-query attention, docs/method.md section 8; GPT-2 has H_kv = H).
    memory_keys: the form the stored keys are in, which the attention gives q and k in:
    'unrotated' (before RoPE) or 'rotated' (as attention sees them)."""

    def __init__(self, keys, values, index, k, settings, memory_keys='unrotated'):
        self.keys, self.values, self.index = keys, values, index
        self.k = k                  # neighbours per selected token-head
        self.settings = settings    # RetrievalSettings
        self.memory_keys = memory_keys
        # for inspection, from the latest call (reset by every call): the selected token-heads
        # (B, H, T) and what they looked up (a Retrieval; None when nothing was selected)
        self.last_selection = None
        self.last_retrieval = None
        self.group = 1  # query heads per key/value head, as the latest call saw them

    def select(self, att: torch.Tensor) -> torch.Tensor:
        """Step 1: which tokens-heads (b, h, j) look up the memory, from the last query row s:
        with MF, those with s >= 1/(MF*T); without, token 0 alone (if s_0 != 0); with BF,
        token 0 only where s_0 > BF."""
        s = att[:, :, -1, :]  # (B, H, T), read only
        BF, MF = self.settings.bookkeeping_frac, self.settings.mem_frac
        if MF != 0:
            selected = s >= 1 / (MF * s.size(-1))  # > 0, so s != 0
        else:
            selected = torch.zeros_like(s, dtype=torch.bool)
            selected[:, :, 0] = s[:, :, 0] != 0
        if BF != 0:
            selected[:, :, 0] &= s[:, :, 0] > BF
        return selected

    def search(self, queries: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Step 2: the k nearest stored keys (squared L2) of each query (n, d) in its head's
        memory. Returns indices (n, k), -1 where the memory holds fewer than k entries."""
        return self.index.search(queries, heads, self.k)

    def memory_values(self, query_j: torch.Tensor, key_j: torch.Tensor, value_j: torch.Tensor,
                      heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 2-6 for n selected token-heads: each one's own query (n, d), the key and value
        (n, d) of its key/value head, and that key/value head (n,), whose memory is searched.
        Returns the new values v' (n, d), and for inspection the rows found (n, k; -1: none)
        and the candidates' weights. A token-head's v' depends on nothing but these inputs."""
        d = key_j.size(-1)
        # 2. neighbours of the token's own key
        found = self.search(key_j, heads)  # (n, k), -1: none
        # exact search in a memory of at least k rows finds k for every query: nothing to mask
        full = not self.index.approximate and self.index.n_entries >= self.k
        nbr = found if full else found.clamp(min=0)
        cand_k = self.keys[heads[:, None], nbr].to(key_j.dtype)  # (n, k, d)
        cand_v = self.values[heads[:, None], nbr].to(value_j.dtype)
        # 3. unless resid_only, the token's own (key, value) is one more candidate
        if not self.settings.resid_only:
            cand_k = torch.cat((key_j[:, None], cand_k), dim=1)
            cand_v = torch.cat((value_j[:, None], cand_v), dim=1)
        # 4. w = softmax(TS * (q_j . key) / sqrt(d)) over the candidates, with token j's own query
        scores = (cand_k @ query_j[:, :, None]).squeeze(-1) * (1.0 / math.sqrt(d))
        scores = scores * self.settings.knn_softmax_influence
        if not full:  # missing neighbours (-1) take no part
            valid = found >= 0
            if not self.settings.resid_only:
                valid = torch.cat((torch.ones_like(valid[:, :1]), valid), dim=1)
            scores = scores.masked_fill(~valid, float('-inf'))
        w = F.softmax(scores, dim=-1)
        # 5. memory vector
        m = (w[:, :, None] * cand_v).sum(dim=1)
        # 6. new value
        r = self.settings.resid_frac
        return ((1 - r) * m + r * value_j if r != 0 else m), found, w

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
        g = h // group if group > 1 else h
        key_j, value_j = k[b, g, j], v[b, h, j]
        new, found, w = self.memory_values(q[b, h, j], key_j, value_j, g)
        self.record(b, h, j, att, key_j, g, found, w, new, value_j)
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
            g = h // group if group > 1 else h
            key_j, value_j = k[b, g, j], v[b, g, j]
            new, found, w = self.memory_values(q[b, h, j], key_j, value_j, g)
            v_mem[b, h, j] = new
            self.record(b, h, j, att, key_j, g, found, w, new, value_j)
            done[b, h, j] = True
        out = expand_kv(v, group)
        out = out.clone() if group == 1 else out  # expand_kv copies for group > 1
        sb, sh, sj = selected.nonzero(as_tuple=True)  # few: a copy of those rows beats a full where
        out[sb, sh, sj] = v_mem[sb, sh, sj]
        return out

    def record(self, b, h, j, att, key_j, heads, found, w, new, old) -> None:
        """Keep what memory_values looked up for token-heads (b, h, j) as last_retrieval."""
        self.last_retrieval = Retrieval(b, h, j, att[b, h, -1, j], found, w, (self.keys, heads, key_j, new, old))


# -----------------------------------------------------------------------------
# what was stored

class Memory:
    """Stored keys and values of the memory layers, {layer: (H_kv, N, d)}, with their provenance
    (meta: the model, text, token windows, bookkeeping settings, documents, index choice).
    saved_index(layer, factory) -> (saved, where): an approximate index's saved bytes (None if
    there are none) and where they are; store.py gives it to a memory loaded from a directory.
    Nothing here writes a file."""

    def __init__(self, keys, values, meta, saved_index=None):
        self.keys, self.values = keys, values  # {layer: (H, N, d)}
        self.meta = meta
        self.saved_index = saved_index
        self._in_use = {}  # (layer, device, search, index, params) -> (keys, values, KNNIndex) there: made once

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

    @property
    def knn_index(self) -> str:
        """The memory's own index choice (build_memory.py --knn_index); 'flat' before it had one."""
        return self.meta.get('knn_index') or 'flat'

    def retrieving_layers(self, settings: RetrievalSettings, device='cpu',
                          search: SearchSettings | str | None = SearchSettings()) -> dict[int, LayerMemory]:
        """{layer: LayerMemory} for the layers that retrieve under `settings`, to give to
        model.attach_memory. The memory itself is not changed: each layer's keys, values and
        search index on a device are made once and shared by every settings value. search: a
        SearchSettings, or just its backend ('faiss', 'torch', None)."""
        settings.check_layers(self.meta['model']['n_layer'])
        missing = [i for i in settings.layers if i not in self.keys]
        if missing:
            raise UserError(f"knn_num asks for layers {missing} but the memory holds layers {self.stored_layers}; "
                            f"rebuild it with --layers={sorted(set(missing) | set(self.stored_layers))} or set those k to 0")
        layers = {}
        for i in settings.layers:
            if settings.memory_mode == 'attention':
                keys, values, index = self.layer_index(i, device, search, normalized=True)
                layers[i] = AttentionMemory(keys, values, index, min(settings.knn_num[i], keys.size(1)),
                                            settings.memory_sim_threshold, self.memory_keys)
                continue
            keys, values, index = self.layer_index(i, device, search)
            # a k beyond the memory's size finds nothing more: those neighbours take no part anyway
            layers[i] = LayerMemory(keys, values, index, min(settings.knn_num[i], keys.size(1)), settings,
                                    self.memory_keys)
        return layers

    def layer_index(self, layer: int, device='cpu', search: SearchSettings | str | None = SearchSettings(),
                    normalized: bool = False):
        """(keys, values, KNNIndex) of one stored layer on `device`, made once per search choice.
        An approximate FAISS index is read from saved_index where it has one (a damaged one
        is built again, with a warning), else trained here. normalized: the index is over the
        keys scaled to unit length (retrieval attention's cosine search; never a saved one)."""
        if not isinstance(search, SearchSettings):  # 'faiss', 'torch' or None, as a shorthand
            search = SearchSettings(search)
        backend, knn_index, params = search.backend(device), search.index_for(self.knn_index), search.params()
        key = (layer, str(device), backend, knn_index, tuple(sorted(params.items())), normalized)
        if key not in self._in_use:
            keys, values = self.keys[layer].to(device), self.values[layer].to(device)
            if normalized:
                unit = F.normalize(keys.float(), dim=-1)
                self._in_use[key] = (keys, values, KNNIndex(unit, backend, knn_index, params))
                return self._in_use[key]
            factory = index_factory(knn_index, keys.size(1), keys.size(2))
            index = None
            if backend == 'faiss' and factory != 'Flat' and self.saved_index is not None:
                saved, where = self.saved_index(layer, factory)
                if saved is not None:
                    try:
                        index = KNNIndex(keys, backend, knn_index, params, saved=saved)
                    except (KeyError, ValueError, RuntimeError) as e:
                        warnings.warn(f"{where} is unreadable ({str(e)[:120]}); building the index again", stacklevel=2)
            self._in_use[key] = (keys, values, index or KNNIndex(keys, backend, knn_index, params))
        return self._in_use[key]

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


def model_identity(model) -> dict:
    cfg = model.config
    return dict(name=model.name, arch=cfg.arch, fingerprint=model.fingerprint(), fingerprint_scheme=FINGERPRINT_SCHEME,
                n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd,
                head_size=cfg.head_dim, vocab_size=cfg.vocab_size, block_size=cfg.block_size)


def check_stored(keys, values, where, fix):
    """Stored keys and values must be (H, N, d) alike and finite (checked head by head, so a
    memory-mapped store is read once, not held)."""
    if keys.dim() != 3 or keys.shape != values.shape:
        raise UserError(f"{where} holds keys {tuple(keys.shape)} and values {tuple(values.shape)}; "
                        f"they must be (heads, N, head_size) alike; {fix}")
    if not all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in zip(keys, values)):
        raise UserError(f"{where} holds NaN or infinite values; {fix}")
