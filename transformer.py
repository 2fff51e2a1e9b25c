"""
The transformer core every model family shares (GPT-2 in model.py, the Llama family in
llama.py): the KV cache, causal attention with the memory hook, the pre-norm block and
the Transformer base class (the forward pass over a stack of blocks, exits, fingerprints).

The attention of a layer calls its memory (memory.LayerMemory) when one is attached:
`update_values(q, k, v, att)` in exact decoding, `cached_values(...)` in cached decoding.
Nothing here knows about FAISS or how the memory was stored.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

FINGERPRINT_SCHEME = 'sha256-all-weights-float32'


class LayerCache:
    """What one layer keeps of the positions seen so far: keys and values, plus queries and
    the memory's state (v' and a computed mask) for a memory layer in cached mode. Buffers
    are allocated once for `capacity` positions, so adding a token writes in place instead
    of copying the whole past (torch.cat would, every step); they grow if a run needs more."""

    def __init__(self, capacity):
        self.capacity, self.length = capacity, 0
        self.buffers = {}

    def extend(self, **new):
        """Append the new positions of each named (B, H, T_new, d) tensor; return views of all positions."""
        T_new = next(iter(new.values())).size(2)
        end = self.length + T_new
        out = {}
        for name, x in new.items():
            buf = self.buffers.get(name)
            if buf is None or buf.size(2) < end:
                grown = x.new_empty(x.size(0), x.size(1), max(self.capacity, end), x.size(3))
                if buf is not None:
                    grown[:, :, :self.length] = buf[:, :, :self.length]
                buf = self.buffers[name] = grown
            buf[:, :, self.length:end] = x
            out[name] = buf[:, :, :end]
        self.length = end
        return out

    def memory_state(self, like, T):
        """Zero-initialised v' (B, H, T, d) and computed mask (B, H, T) of a memory layer in cached mode."""
        if 'v_mem' not in self.buffers:
            B, H, _, d = like.shape
            self.buffers['v_mem'] = like.new_zeros(B, H, max(self.capacity, T), d)
            self.buffers['done'] = torch.zeros(B, H, max(self.capacity, T), dtype=torch.bool, device=like.device)
        return self.buffers['v_mem'][:, :, :T], self.buffers['done'][:, :, :T]


def causal_mask(T_new: int, T_all: int, device) -> torch.Tensor:
    """(T_new, T_all) boolean mask for the T_new newest of T_all positions: each sees itself and the past."""
    return torch.ones(T_new, T_all, dtype=torch.bool, device=device).tril(diagonal=T_all - T_new)


def expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H_kv, T, d) -> (B, H_kv * group, T, d): key/value head g serves query heads g*group .. g*group+group-1."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


@dataclass(frozen=True)
class Pass:
    """What one forward pass asks of every attention layer it runs."""
    use_memory: bool = True      # attached memories act (False: the plain model, as when building a memory)
    need_att: bool = False       # compute and return the attention weights
    cached_memory: bool = False  # memory layers keep a KV cache too (cached decoding, an approximation)


PLAIN = Pass(use_memory=False)


def attend(memory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rope=None, cache: LayerCache | None = None,
           rerun: bool = False, last_only: bool = False, how: Pass = Pass()
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """Causal attention with a KV cache and the memory hook, for every model family.

    q (B, H, T, d) and k, v (B, H_kv, T, d) are the T newest positions, q and k before RoPE;
    query head h reads key/value head h // (H / H_kv) (grouped-query attention; GPT-2 has
    H_kv = H and no RoPE). The cache keeps k before RoPE, so the memory can read keys in
    either form (docs/method.md section 8); rope(x, start) rotates x as positions start, start+1, ...
    memory: the layer's memory.LayerMemory or None.
    cache: this layer's LayerCache, which holds the earlier positions and receives these.
    rerun: y for every position, the cached ones too, with their q, k, v taken from the cache
    (exact decoding's first rerun layer, whose input for past positions never changes).
    last_only: y of the last position only (the top layer, when only the next logits are wanted).
    Returns y (B, T_out, H * d), (k, v) of all positions (k before RoPE), and att
    (B, H, T_q, T_all) when it was computed.
    """
    retrieve = how.use_memory and memory is not None
    reads_attention = retrieve and getattr(memory, 'reads', 'values') == 'attention'
    if retrieve and not reads_attention and cache is not None and not (how.cached_memory or rerun):
        raise ValueError("exact memory attention reruns the whole sequence; "
                         "a KV cache in a memory layer needs cached_memory=True")
    q_all = q
    if cache is not None:
        full = cache.extend(k=k, v=v, **(dict(q=q) if retrieve or rerun else {}))
        k, v, q_all = full['k'], full['v'], full.get('q', q)
        if rerun:
            q = q_all
    present = (k, v)
    B, H, T_q, d = q.shape
    T_all, group = k.size(2), H // k.size(1)
    q_rot, k_rot = (rope(q, T_all - T_q), rope(k, 0)) if rope is not None else (q, k)
    if reads_attention:  # retrieval attention (retrieval_attention.py): past positions never change
        mem_q = q_rot if rope is not None and memory.memory_keys == 'rotated' else q
        if last_only:
            q_rot, mem_q = q_rot[:, :, -1:], mem_q[:, :, -1:]
        y, att = memory.attend(q_rot, k_rot, v, mem_q, None if last_only else causal_mask(T_q, T_all, q.device))
        return y.transpose(1, 2).reshape(B, y.size(2), H * d), present, att
    att = None
    if retrieve or how.need_att or last_only:
        # explicit attention: the memory needs the attention weights. For the top layer, when
        # only the next token's logits are wanted, the last query row is enough (it sees
        # every position); step 4 of the method still uses every selected token's own query.
        att = ((q_rot[:, :, -1:] if last_only else q_rot) @ expand_kv(k_rot, group).transpose(-2, -1)) \
            * (1.0 / math.sqrt(d))
        if not last_only:
            att = att.masked_fill(~causal_mask(T_q, T_all, q.device), float('-inf'))
        att = F.softmax(att, dim=-1)
        if retrieve:
            # the memory's q and k of every position, in the form its keys were stored in
            rotated = rope is not None and memory.memory_keys == 'rotated'
            mem_q, mem_k = (rope(q_all, 0), k_rot) if rotated else (q_all, k)
            if how.cached_memory and cache is not None:
                v = memory.cached_values(mem_q, mem_k, v, att, *cache.memory_state(q_all, T_all))
            else:
                v = memory.update_values(mem_q, mem_k, v, att)  # v' per query head
        else:
            v = expand_kv(v, group)
        y = att @ v
    elif T_q == 1 or T_q == T_all:
        y = F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=T_q > 1, enable_gqa=group > 1)
    else:  # several new positions after a cache
        y = F.scaled_dot_product_attention(q_rot, k_rot, v, attn_mask=causal_mask(T_q, T_all, q.device),
                                           enable_gqa=group > 1)
    return y.transpose(1, 2).reshape(B, y.size(2), H * d), present, att

def pre_norm_block(x: torch.Tensor, norm_1, attn, norm_2, mlp, *, rope=None, cache: LayerCache | None = None,
                   rerun: bool = False, last_only: bool = False, how: Pass = Pass()):
    """x + attn(norm_1(x)), then + mlp(norm_2(.)): every family's block. x: (B, T, C). With rerun,
    x holds every position and those already in the cache are not projected again; with
    last_only, only the last position comes out. Returns x, (k, v), att (see attend)."""
    h = norm_1(x[:, cache.length:] if rerun else x)
    a, present, att = attn(h, rope=rope, cache=cache, rerun=rerun, last_only=last_only, how=how)
    x = (x[:, -1:] if last_only else x) + a
    x = x + mlp(norm_2(x))
    return x, present, att


class Transformer(nn.Module):
    """What every model family shares: the memory hook, the KV cache, the forward pass over a
    stack of blocks, exits, fingerprints (decoding.py decodes with it). A family (model.GPT,
    llama.Llama) defines its modules, `blocks` (the nn.ModuleList), `rope` (or None),
    embed(idx, pos_start) and head(x); each block's attention module is `block.attn`."""

    def fingerprint(self) -> str:
        """SHA-256 over every weight: each tensor's name and shape and all its values as float32
        bytes (a tied tensor once). Memories and sweep results record it, so a memory is never
        used with a model it was not built by, whichever weight differs. About 1.5 GB/s here
        (0.3 s for GPT-2 small); cached until a weight changes in place."""
        params = self.state_dict()
        key = tuple((name, p.data_ptr(), p._version) for name, p in params.items())
        if getattr(self, '_fingerprint', (None,))[0] != key:
            h, seen = hashlib.sha256(), {}
            for name, p in params.items():
                h.update(f"{name}{tuple(p.shape)}".encode())
                if p.data_ptr() in seen:
                    h.update(f"tied to {seen[p.data_ptr()]}".encode())
                    continue
                seen[p.data_ptr()] = name
                h.update(p.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = (key, h.hexdigest()[:16])
        return self._fingerprint[1]

    def fingerprint_sampled(self) -> str:
        """The fingerprint of format-1 memories (scheme 'sampled-v1'): every tensor's name and
        shape and one value in ~4096. Only for checking memories saved with it."""
        h = hashlib.sha256()
        for name, p in self.state_dict().items():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(flat[::step].to('cpu', torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]

    # --- memory ----------------------------------------------------------------

    def attach_memory(self, layers: dict | None) -> None:
        """Give the memory layers their retrieval: `layers` is {layer index: memory.LayerMemory}
        (what Memory.retrieving_layers hands out); None or {} detaches every layer."""
        layers = layers or {}
        for i, block in enumerate(self.blocks):
            block.attn.memory = layers.get(i)

    def memory_layers(self, changing_past: bool = False) -> list[int]:
        """The layers with a memory attached; changing_past: only those whose memory changes past
        positions' outputs (the value mode), which exact decoding must rerun."""
        return [i for i, b in enumerate(self.blocks) if b.attn.memory is not None and
                (not changing_past or getattr(b.attn.memory, 'changes_past', True))]

    # activation addition (docs/method.md section 9, actadd.py): an object with `layer` and
    # add(x, pos_start), which changes the residual stream entering that block; None = off
    steering = None

    # --- forward ---------------------------------------------------------------

    def new_cache(self, capacity: int | None = None) -> list[LayerCache]:
        """An empty KV cache: one LayerCache per layer, for `capacity` positions (default block_size)."""
        return [LayerCache(capacity or self.config.block_size) for _ in range(self.config.n_layer)]

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, *, caches=None, rerun_cache: LayerCache | None = None,
                   last_only: bool = False, pos_start: int = 0, capture: dict | None = None,
                   how: Pass = Pass()) -> tuple[torch.Tensor, list, list]:
        """Blocks start .. stop-1 over x (B, T, C), the hidden states entering block `start`,
        whose first position stands at pos_start of the sequence.

        caches: per layer index, a LayerCache (a list from new_cache() or a dict). rerun_cache:
        block `start` reruns every position, reusing the q, k, v of the positions in this cache
        (exact decoding). last_only: the top block returns the last position only. capture:
        {i: None} receives the residual stream of the last position after the first i blocks.
        how: what the pass asks of attention (Pass). Returns (x, kv, atts): per block, (k, v)
        of all positions and the attention weights (None where not computed)."""
        kv, atts = [], []
        for i in range(start, stop):
            if self.steering is not None and i == self.steering.layer:
                x = self.steering.add(x, pos_start)
            rerun = i == start and rerun_cache is not None
            cache = rerun_cache if rerun else caches[i] if caches is not None else None
            x, present, att = self.blocks[i](x, rope=self.rope, cache=cache, rerun=rerun,
                                             last_only=last_only and i == self.config.n_layer - 1, how=how)
            kv.append(present)
            atts.append(att)
            if capture is not None and i + 1 in capture:
                capture[i + 1] = x[:, -1]
        return x, kv, atts

    def forward(self, idx: torch.Tensor, *, cache: list[LayerCache] | None = None, use_memory: bool = True,
                return_att: bool = False, all_logits: bool = False, cached_memory: bool = False):
        """idx: (B, T) token ids of the newest T positions.

        cache: from new_cache(); it holds the keys and values of the earlier positions and
        receives these. Returns (logits, kv, atts): logits of the last position (B, 1, V), or
        of every position with all_logits; kv: per layer (k, v) of all positions; atts: per
        layer attention weights (B, H, T, T_all) with return_att. cached_memory: memory layers
        keep a KV cache too (the approximate cached mode, see decoding.Decoder).
        """
        pos_start = cache[0].length if cache else 0
        x = self.embed(idx, pos_start)
        # the top layer's other positions feed nothing when only the last logits are wanted
        x, kv, atts = self.run_blocks(x, 0, self.config.n_layer, caches=cache, pos_start=pos_start,
                                      last_only=not (all_logits or return_att),
                                      how=Pass(use_memory, return_att, cached_memory))
        logits = self.head(x if all_logits else x[:, [-1], :])
        return logits, kv, atts

    @torch.no_grad()
    def exits(self, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        """The logits of every exit at the last position, {i: (B, V)} for i = 1..n_layer:
        head(h_i), h_i the residual stream after the first i blocks (docs/method.md section 6; the
        logit lens). One full pass; an attached memory acts as it does on a prompt."""
        captured = dict.fromkeys(range(1, self.config.n_layer + 1))
        self.run_blocks(self.embed(idx), 0, self.config.n_layer, capture=captured)
        return {i: self.head(h) for i, h in captured.items()}
