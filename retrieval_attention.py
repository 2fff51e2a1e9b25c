"""
The second way to read a memory (docs/method.md section 10): retrieval attention, as Extended
Mind Transformers read theirs. In a memory layer every query position i and query head h looks
up the k stored rows of key/value head g(h) whose keys are most similar to its own query
(cosine similarity), and attends over them together with its context in one softmax:

    w = softmax([q . K_r / sqrt(d) for the k rows r] ++ [q_rot . k_rot_j / sqrt(d) for j <= i])
    y = sum_r w_r V_r + sum_j w_j v_j

What a position retrieves depends only on its own query, so past positions never change: an
ordinary KV cache is exact and the cost per token does not grow with the context. The same
memory directories serve both ways of reading (keys per layer and key/value head, unrotated by
default). The write-up's selection parameters (MF, BF, TS, r, resid_only) do not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transformer import expand_kv


@dataclass
class AttentionRetrieval:
    """What one retrieval-attention layer looked up in its latest call, per query position:
    rows (B, H, T, k) found (-1 where none), their cosine similarity, the attention weight each
    received, and the share of each position's attention that went to the memory (B, H, T)."""
    rows: torch.Tensor
    similarity: torch.Tensor
    weights: torch.Tensor
    memory_share: torch.Tensor


class AttentionMemory:
    """One layer's memory read by retrieval attention: stored keys and values (H_kv, N, d), a
    search index over the keys normalised to unit length (squared L2 between unit vectors ranks
    exactly as cosine similarity does), k rows per query and an optional similarity threshold
    (rows at or below it get no weight). memory_keys: the form the stored keys are in."""

    reads = 'attention'
    changes_past = False  # decoding keeps an ordinary KV cache in this layer

    def __init__(self, keys, values, index, k, sim_threshold=None, memory_keys='unrotated'):
        self.keys, self.values, self.index, self.k = keys, values, index, k
        self.sim_threshold, self.memory_keys = sim_threshold, memory_keys
        self.last_retrieval = None

    def attend(self, q_rot, k_rot, v, q_mem, mask=None):
        """Attention of q_rot (B, H, T, d) over the context k_rot, v (B, H_kv, T_all, d) (causal
        `mask` (T, T_all), or None for the last position only) and over the k stored rows each
        query q_mem (q in the stored keys' form) retrieves. Returns y (B, H, T, d) and the
        context part of the attention weights (B, H, T, T_all)."""
        B, H, T, d = q_rot.shape
        group = H // self.keys.size(0)
        scale = 1.0 / math.sqrt(d)
        ctx = (q_rot @ expand_kv(k_rot, group).transpose(-2, -1)) * scale
        if mask is not None:
            ctx = ctx.masked_fill(~mask, float('-inf'))
        # retrieval: each query's k most similar stored keys of its key/value head
        heads = (torch.arange(H, device=q_mem.device) // group).view(1, H, 1).expand(B, H, T).reshape(-1)
        queries = q_mem.reshape(-1, d)
        found = self.index.search(F.normalize(queries.float(), dim=-1), heads, self.k)  # (n, k), -1 where none
        safe = found.clamp(min=0)
        K = self.keys[heads[:, None], safe].to(q_rot.dtype)      # (n, k, d)
        V = self.values[heads[:, None], safe].to(q_rot.dtype)
        mem = torch.einsum('nd,nkd->nk', queries, K) * scale
        sim = F.cosine_similarity(queries[:, None].float(), K.float(), dim=-1)
        drop = found < 0
        if self.sim_threshold is not None:
            drop |= sim <= self.sim_threshold
        mem = mem.masked_fill(drop, float('-inf')).view(B, H, T, -1)
        w = F.softmax(torch.cat((mem, ctx), dim=-1), dim=-1)
        k_found = mem.size(-1)
        w_mem, w_ctx = w[..., :k_found], w[..., k_found:]
        y = torch.einsum('bhtk,bhtkd->bhtd', w_mem, V.view(B, H, T, k_found, d)) + w_ctx @ expand_kv(v, group)
        self.last_retrieval = AttentionRetrieval(found.view(B, H, T, -1), sim.view(B, H, T, -1).masked_fill(
            drop.view(B, H, T, -1), float('nan')), w_mem, w_mem.sum(-1))
        return y, w_ctx
