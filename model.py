"""
GPT-2, written by hand in the nanoGPT manner, with a hook for the persistent memory.

Read top to bottom:
  1. loading a Hugging Face GPT-2 checkpoint (hub name or local directory) and its tokenizer
  2. the model: attention (with a KV cache and the memory hook), MLP, block, GPT
  3. decoding in two named phases, prefill then one step per token (Decoder), and
     generation with nanoGPT's sampling on top of it

The attention of a layer calls `self.memory.update_values(q, k, v, att)` when a memory is
attached to it (see memory.py, where the method's equations live). The model knows
nothing about FAISS.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError
from hub import GPT2_NAMES, hub_files, is_hub_id

# -----------------------------------------------------------------------------
# 1. checkpoints and tokenizer

CHECKPOINT_FILES = ('config.json', 'model.safetensors', 'vocab.json', 'merges.txt')


def resolve_checkpoint(init_from: str) -> str:
    """A local directory holding CHECKPOINT_FILES for `init_from`: a local directory in the
    Hugging Face layout, or a hub id (hub.py: a GPT-2 short name, "owner/name[@revision]"),
    read from huggingface_hub's cache or downloaded into it once."""
    if os.path.isdir(init_from):
        missing = [f for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(init_from, f))]
        if missing:
            raise UserError(f"checkpoint directory {init_from} lacks {', '.join(missing)}; "
                            f"it needs {', '.join(CHECKPOINT_FILES)} (the Hugging Face layout)")
        return init_from
    if not is_hub_id(init_from):
        raise UserError(f"init_from={init_from!r} is neither a directory nor a hub id; pass one of "
                        f"{', '.join(GPT2_NAMES)}, a hub id (owner/name, optionally @revision) or --init_from=DIR "
                        f"with {', '.join(CHECKPOINT_FILES)}")
    return os.path.dirname(hub_files(init_from, CHECKPOINT_FILES)['config.json'])


# GPT-2's pre-tokenisation pattern (the same one tiktoken's "gpt2" encoding uses)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = '<|endoftext|>'
FINGERPRINT_SCHEME = 'sha256-all-weights-float32'


def _byte_decoder():
    """GPT-2's vocab.json spells bytes as printable characters; map them back to byte values."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def load_tokenizer(ckpt_dir: str) -> tiktoken.Encoding:
    """A tiktoken Encoding built from the checkpoint's vocab.json and merges.txt.

    In GPT-2's byte-level BPE a token's id is also its merge rank, which is exactly what
    tiktoken's mergeable_ranks are, so the vocabulary can be used as it is.
    """
    with open(os.path.join(ckpt_dir, 'vocab.json'), encoding='utf-8') as f:
        vocab = json.load(f)
    decoder = _byte_decoder()
    ranks, special = {}, {}
    for token, idx in vocab.items():
        if token == EOT:
            special[token] = idx
        else:
            ranks[bytes(decoder[ch] for ch in token)] = idx
    # merges.txt must agree with the ids: the n-th merge makes token 256 + n
    with open(os.path.join(ckpt_dir, 'merges.txt'), encoding='utf-8') as f:
        merges = [line.split() for line in f.read().split('\n')[1:] if line.strip()]
    for n, (a, b) in enumerate(merges[:8]):
        if vocab.get(a + b) != 256 + n:
            raise UserError(f"{ckpt_dir}: merges.txt and vocab.json disagree at merge {n} ({a} {b}); "
                            f"the tokenizer files are not a GPT-2 byte-level BPE pair")
    name = 'gpt2-' + os.path.basename(os.path.normpath(ckpt_dir))
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def encode(enc, text: str) -> list[int]:
    """Token ids of text: GPT-2's tiktoken Encoding ('<|endoftext|>' allowed), or a tokenizer
    with its own encode (llama.HFTokenizer, which adds BOS where its configuration says so)."""
    if hasattr(enc, 'special_tokens_set'):
        return enc.encode(text, allowed_special={EOT} & enc.special_tokens_set)
    return enc.encode(text)


# -----------------------------------------------------------------------------
# 2. the model

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_epsilon: float = 1e-5
    arch = 'gpt2'  # the model family; llama.LlamaConfig has the same names (arch, n_kv_head, head_dim)

    @property
    def n_kv_head(self):
        return self.n_head  # no grouped-query attention in GPT-2

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def new_gelu(x):
    """GELU as in GPT-2: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), HF's "gelu_new".
    torch's fused kernel computes this formula in one pass over memory instead of seven."""
    return F.gelu(x, approximate='tanh')


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


def attend(memory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rope=None, cache: LayerCache | None = None,
           use_memory: bool = True, need_att: bool = False, cached_memory: bool = False, rerun: bool = False,
           last_only: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """Causal attention with a KV cache and the memory hook, for every model family.

    q (B, H, T, d) and k, v (B, H_kv, T, d) are the T newest positions, q and k before RoPE;
    query head h reads key/value head h // (H / H_kv) (grouped-query attention; GPT-2 has
    H_kv = H and no RoPE). The cache keeps k before RoPE, so the memory can read keys in
    either form (METHOD.md section 8); rope(x, start) rotates x as positions start, start+1, ...
    memory: the layer's memory.LayerMemory or None. Flags as in CausalSelfAttention.forward.
    Returns y (B, T_out, H * d), (k, v) of all positions (k before RoPE), and att
    (B, H, T_q, T_all) when it was computed.
    """
    retrieve = use_memory and memory is not None
    if retrieve and cache is not None and not (cached_memory or rerun):
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
    att = None
    if retrieve or need_att or last_only:
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
            if cached_memory and cache is not None:
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


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.memory = None  # a memory.LayerMemory, attached by GPT.attach_memory

    def forward(self, x, *, rope=None, **flags):
        """x: (B, T, C), the T newest positions. Flags (all keyword-only):
        cache: this layer's LayerCache, which holds the earlier positions and receives these.
        rerun: y for every position, the cached ones too, with their q, k, v taken from the
        cache (exact decoding's first rerun layer, whose input for past positions never
        changes). last_only: y of the last position only (the top layer, when only the next
        token's logits are wanted). cached_memory: a memory layer with a KV cache (cached
        mode). use_memory, need_att. Returns y, (k, v) of all positions, att (see attend)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y, present, att = attend(self.memory, q, k, v, rope=rope, **flags)  # rope: None in GPT-2
        return self.c_proj(y), present, att


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(new_gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, **flags):
        return pre_norm_block(x, self.ln_1, self.attn, self.ln_2, self.mlp, **flags)


def pre_norm_block(x: torch.Tensor, norm_1, attn, norm_2, mlp, *, cache: LayerCache | None = None, rerun: bool = False,
                   last_only: bool = False, **attn_flags):
    """x + attn(norm_1(x)), then + mlp(norm_2(.)): every family's block. x: (B, T, C). With rerun,
    x holds every position and those already in the cache are not projected again; with
    last_only, only the last position comes out. Returns x, (k, v), att."""
    h = norm_1(x[:, cache.length:] if rerun else x)
    a, present, att = attn(h, cache=cache, rerun=rerun, last_only=last_only, **attn_flags)
    x = (x[:, -1:] if last_only else x) + a
    x = x + mlp(norm_2(x))
    return x, present, att


class Transformer(nn.Module):
    """What every model family shares: the memory hook, the KV cache, the forward pass over a
    stack of blocks, decoding, fingerprints. A family (GPT below, llama.Llama) defines its
    modules, `blocks` (the nn.ModuleList), `rope` (or None), embed(idx, pos_start) and head(x)."""

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

    def memory_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.attn.memory is not None]

    # activation addition (METHOD.md section 9, actadd.py): an object with `layer` and
    # add(x, pos_start), which changes the residual stream entering that block; None = off
    steering = None

    # --- forward ---------------------------------------------------------------

    def new_cache(self, capacity: int | None = None) -> list[LayerCache]:
        """An empty KV cache: one LayerCache per layer, for `capacity` positions (default block_size)."""
        return [LayerCache(capacity or self.config.block_size) for _ in range(self.config.n_layer)]

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, *, caches=None, rerun_cache: LayerCache | None = None,
                   last_only: bool = False, pos_start: int = 0, capture: dict | None = None,
                   **attn_flags) -> tuple[torch.Tensor, list, list]:
        """Blocks start .. stop-1 over x, the hidden states entering block `start`, whose first
        position stands at pos_start of the sequence.

        caches: per layer index, a LayerCache (a list from new_cache() or a dict). rerun_cache:
        block `start` reruns every position, reusing the q, k, v of the positions in this cache
        (exact decoding). last_only: the top block returns the last position only. capture:
        {i: None} receives the residual stream of the last position after the first i blocks.
        Returns (x, kv, atts): per block, (k, v) of all positions and the attention weights."""
        kv, atts = [], []
        for i in range(start, stop):
            if self.steering is not None and i == self.steering.layer:
                x = self.steering.add(x, pos_start)
            rerun = i == start and rerun_cache is not None
            cache = rerun_cache if rerun else caches[i] if caches is not None else None
            x, present, att = self.blocks[i](x, cache=cache, rerun=rerun,
                                             last_only=last_only and i == self.config.n_layer - 1,
                                             rope=self.rope, **attn_flags)
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
        keep a KV cache too (the approximate cached mode, see generate).
        """
        pos_start = cache[0].length if cache else 0
        x = self.embed(idx, pos_start)
        # the top layer's other positions feed nothing when only the last logits are wanted
        x, kv, atts = self.run_blocks(x, 0, self.config.n_layer, caches=cache, pos_start=pos_start,
                                      last_only=not (all_logits or return_att), use_memory=use_memory,
                                      need_att=return_att, cached_memory=cached_memory)
        logits = self.head(x if all_logits else x[:, [-1], :])
        return logits, kv, atts

    @torch.no_grad()
    def exits(self, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        """The logits of every exit at the last position, {i: (B, V)} for i = 1..n_layer:
        head(h_i), h_i the residual stream after the first i blocks (METHOD.md section 6; the
        logit lens). One full pass; an attached memory acts as it does on a prompt."""
        captured = dict.fromkeys(range(1, self.config.n_layer + 1))
        self.run_blocks(self.embed(idx), 0, self.config.n_layer, capture=captured)
        return {i: self.head(h) for i, h in captured.items()}

    # --- generation ------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, *,
                 generators: list[torch.Generator] | None = None, progress=None, mode: str = 'exact',
                 readout: Readout | None = None) -> torch.Tensor:
        """Continue each row of idx (B, T) by max_new_tokens sampled tokens (nanoGPT semantics).

        generators: one torch.Generator per row (CPU), so row i draws exactly what a run of
        its own would; None uses torch's global generator (as nanoGPT). Sampling happens on
        the CPU, so a CUDA run draws the same tokens as a CPU run from the same probabilities.
        mode: 'exact' (the method) or 'cached' (an approximation); see Decoder. readout: which
        logits are sampled from (an exit layer or a contrast of two, METHOD.md section 6).
        """
        if idx.size(1) > self.config.block_size:
            warnings.warn(f"prompt of {idx.size(1)} tokens is longer than block_size {self.config.block_size}; "
                          f"only its last {self.config.block_size} tokens are used", stacklevel=2)
        decoder = Decoder(self, mode, capacity=idx.size(1) + max_new_tokens, readout=readout)
        logits = decoder.prefill(idx)
        for step in range(max_new_tokens):
            idx_next = sample_next(logits, temperature, top_k, generators).to(idx.device)
            idx = torch.cat((idx, idx_next), dim=1)
            if progress is not None:
                progress.update(1)
            if step < max_new_tokens - 1:
                logits = decoder.step(idx_next)
        return idx


class GPT(Transformer):
    """GPT-2."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.name = 'random'  # where the weights came from, for memory manifests
        self.rope = None  # learned position embeddings instead

    @property
    def blocks(self):
        return self.transformer.h

    def embed(self, idx: torch.Tensor, pos_start: int = 0) -> torch.Tensor:
        """Token plus position embeddings of idx (B, T), whose first token stands at pos_start."""
        T = idx.size(1)
        if pos_start + T > self.config.block_size:
            raise ValueError(f"cannot forward {pos_start + T} positions, block size is {self.config.block_size}")
        pos = torch.arange(pos_start, pos_start + T, dtype=torch.long, device=idx.device)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's hidden states: final layer norm, then the LM head."""
        return self.lm_head(self.transformer.ln_f(x))

    # --- loading -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, init_from: str) -> tuple[GPT, tiktoken.Encoding]:
        """Load a GPT-2 checkpoint (hub name or directory). Returns (model, tokenizer)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        ckpt_dir = resolve_checkpoint(init_from)
        config_file = os.path.join(ckpt_dir, 'config.json')
        try:
            with open(config_file, encoding='utf-8') as f:
                hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{config_file} is not valid JSON ({e}); the checkpoint is damaged") from None
        if not isinstance(hf, dict):
            raise UserError(f"{config_file} holds a {type(hf).__name__}, not a model config; the checkpoint is damaged")
        act = hf.get('activation_function', 'gelu_new')
        if hf.get('model_type', 'gpt2') != 'gpt2' or act not in ('gelu_new', 'gelu_pytorch_tanh'):
            raise UserError(f"{ckpt_dir}/config.json describes a {hf.get('model_type')} model with "
                            f"activation {act}; only GPT-2 checkpoints are supported")
        fields = ('n_positions', 'vocab_size', 'n_layer', 'n_head', 'n_embd')
        bad = [k for k in fields if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool) or hf[k] < 1]
        if bad or hf['n_embd'] % hf['n_head']:
            raise UserError(f"{config_file} lacks or has bad values for {', '.join(bad) or 'n_embd / n_head'}; "
                            f"a GPT-2 config needs whole numbers {', '.join(fields)} (n_embd divisible by n_head)")
        config = GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                           n_head=hf['n_head'], n_embd=hf['n_embd'],
                           layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-5))
        model = cls(config)
        try:
            sd_hf = load_file(os.path.join(ckpt_dir, 'model.safetensors'))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{ckpt_dir}/model.safetensors cannot be read ({e}); the checkpoint is truncated or "
                            f"damaged: download or copy it again") from None
        sd_hf = {k.removeprefix('transformer.'): v for k, v in sd_hf.items()
                 if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
        sd = model.state_dict()
        # the OpenAI checkpoints use a "Conv1D" module, (in, out): transpose into nn.Linear's (out, in)
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        expected = {k.removeprefix('transformer.') for k in sd if k != 'lm_head.weight'}
        if set(sd_hf) - {'lm_head.weight'} != expected:
            diff = sorted(expected ^ (set(sd_hf) - {'lm_head.weight'}))
            raise UserError(f"{ckpt_dir}/model.safetensors does not hold GPT-2 weights of this config "
                            f"(mismatched names, e.g. {diff[:3]})")
        with torch.no_grad():
            for k in sd:
                if k == 'lm_head.weight':
                    continue  # tied to wte
                w = sd_hf[k.removeprefix('transformer.')]
                if k.endswith(transposed):
                    w = w.t()
                if w.shape != sd[k].shape:
                    raise UserError(f"{ckpt_dir}: {k} has shape {tuple(w.shape)}, config.json implies {tuple(sd[k].shape)}")
                sd[k].copy_(w)
        model.name = init_from if not os.path.isdir(init_from) else os.path.basename(os.path.normpath(init_from))
        model.eval()
        return model, load_tokenizer(ckpt_dir)

class Decoder:
    """Decoding in two phases, as gpt-fast names them: prefill(prompt), then step(token) once per
    new token; each returns the next token's logits (B, V).

    mode='exact' (the default) is the method's decoding: a memory layer changes the values of
    past tokens, and its selection depends on the newest token, so every layer from the first
    memory layer on (the first rerun layer) is rerun over the whole sequence for each new
    token (METHOD.md section 2). Layers below it are unaffected and keep a KV cache; the first
    rerun layer's input never changes either, so it projects q, k, v for the new token only.

    mode='cached' is an approximation whose cost per token does not grow with the context:
    every layer keeps an ordinary KV cache, so past positions keep the states they had; a
    memory layer selects from the new token's attention row and attends with memory-updated
    values for the selected past tokens-heads (each computed once). The prefill is the same
    as in exact mode, and so is the first generated token.

    Once the sequence is longer than block_size the window slides: positions shift, so each
    step is a fresh prefill of the last block_size tokens.
    """

    def __init__(self, model, mode='exact', capacity=None, readout=None):
        if mode not in ('exact', 'cached'):
            raise ValueError(f"mode={mode!r}: use 'exact' or 'cached'")
        self.model, self.cached = model, mode == 'cached'
        n_layer, block_size = model.config.n_layer, model.config.block_size
        self.capacity = min(capacity or block_size, block_size)  # positions the caches are sized for
        self.readout = readout if readout is not None and not readout.is_plain(n_layer) else None
        # blocks above the highest exit read out feed nothing: they are not run
        self.top = self.readout.top() if self.readout else n_layer
        self.first_rerun_layer = n_layer if self.cached else min(model.memory_layers(), default=n_layer)
        self.first_rerun_layer = min(self.first_rerun_layer, self.top)
        self.tokens = None           # (B, T): every token so far
        self.caches = None           # KV caches of the layers below first_rerun_layer
        self.rerun_cache = None      # q, k, v of first_rerun_layer for the positions already seen
        self.hidden_at_rerun = None  # (B, T, C): hidden states entering first_rerun_layer

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Run the prompt idx (B, T) (its last block_size tokens) through the model."""
        self.tokens = idx
        window = idx[:, -self.model.config.block_size:]
        self.caches = self.model.new_cache(self.capacity)[:self.first_rerun_layer]
        self.rerun_cache = LayerCache(self.capacity)
        self.captured = dict.fromkeys(self.readout.layers()) if self.readout else None
        self.hidden_at_rerun, _, _ = self.model.run_blocks(self.model.embed(window), 0, self.first_rerun_layer,
                                                           caches=self.caches, cached_memory=self.cached,
                                                           capture=self.captured)
        return self._next_logits()

    def step(self, idx_next: torch.Tensor) -> torch.Tensor:
        """Add one token per row, idx_next (B, 1)."""
        self.tokens = torch.cat((self.tokens, idx_next), dim=1)
        T = self.tokens.size(1)
        if T > self.model.config.block_size:
            return self.prefill(self.tokens)
        new, _, _ = self.model.run_blocks(self.model.embed(idx_next, T - 1), 0, self.first_rerun_layer,
                                          caches=self.caches, cached_memory=self.cached, pos_start=T - 1,
                                          capture=self.captured)
        rerun = self.first_rerun_layer < self.top
        self.hidden_at_rerun = torch.cat((self.hidden_at_rerun, new), dim=1) if rerun else new
        return self._next_logits()

    def _next_logits(self):
        h = self.hidden_at_rerun
        if self.first_rerun_layer < self.top:
            h, _, _ = self.model.run_blocks(h, self.first_rerun_layer, self.top, rerun_cache=self.rerun_cache,
                                            last_only=True, capture=self.captured)
        if self.readout is None:
            return self.model.head(h[:, -1, :])
        return self.readout.logits({i: self.model.head(x) for i, x in self.captured.items()})


@dataclass(frozen=True)
class Readout:
    """Which logits decoding samples from (METHOD.md section 6, seed 004's shared-head mode).
    Exit i's logits are head(h_i), h_i the residual stream after the first i blocks (1 <= i <=
    n_layer; i = n_layer is the ordinary output). exit_layer reads one exit; contrast_layers
    (U, L) reads log p of the auto-contrast of exit U against exit L with contrast_alpha.
    Neither set: the ordinary output. The memory acts inside the blocks either way."""
    exit_layer: int | None = None
    contrast_layers: tuple | None = None
    contrast_alpha: float = 0.1

    def check(self, n_layer: int) -> None:
        if self.exit_layer is not None and self.contrast_layers is not None:
            raise UserError("exit_layer and contrast_layers are alternatives: set one of them")
        if self.exit_layer is not None and not 1 <= self.exit_layer <= n_layer:
            raise UserError(f"exit_layer={self.exit_layer} must count blocks from 1 to {n_layer} (n_layer: the "
                            f"model's ordinary output)")
        if self.contrast_layers is not None:
            c = self.contrast_layers
            if len(c) != 2 or not all(isinstance(i, int) and 1 <= i <= n_layer for i in c) or c[1] > c[0]:
                raise UserError(f"contrast_layers={list(c)} must be [U, L], exits 1 <= L <= U <= {n_layer} "
                                f"(U the upper, L the lower)")
            if not 0 <= self.contrast_alpha <= 1:
                raise UserError(f"contrast_alpha={self.contrast_alpha} must be in [0, 1]")

    def is_plain(self, n_layer: int) -> bool:
        """True when this reads the ordinary output (nothing set, or exit_layer = n_layer)."""
        return self.contrast_layers is None and self.exit_layer in (None, n_layer)

    def layers(self) -> list[int]:
        return [self.exit_layer] if self.exit_layer is not None else list(dict.fromkeys(self.contrast_layers))

    def top(self) -> int:
        return max(self.layers())

    def logits(self, exits: dict) -> torch.Tensor:
        """What sampling treats as the logits, from the exits' logits {i: (B, V)}."""
        if self.exit_layer is not None:
            return exits[self.exit_layer]
        upper, lower = self.contrast_layers
        return contrast(exits[upper], exits[lower], self.contrast_alpha)


def contrast(logits_upper: torch.Tensor, logits_lower: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Auto-contrastive log-probabilities (METHOD.md section 6): p_U, p_L = softmax; the tokens
    with p_U >= alpha * max(p_U) (the top one at least) share their total p_U in proportion to
    softmax(log p_U - log p_L) over them; the others keep p_U. Returns the log of that."""
    log_pu = F.log_softmax(logits_upper.float(), dim=-1)
    log_pl = F.log_softmax(logits_lower.float(), dim=-1)
    p_u = log_pu.exp()
    keep = p_u >= alpha * p_u.max(dim=-1, keepdim=True).values
    keep |= F.one_hot(p_u.argmax(dim=-1), p_u.size(-1)).bool()
    mass = (p_u * keep).sum(dim=-1, keepdim=True)
    shared = F.softmax((log_pu - log_pl).masked_fill(~keep, float('-inf')), dim=-1) * mass
    return torch.where(keep, shared, p_u).log()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One nanoGPT sampling step for logits (B, V): temperature, top-k, softmax, multinomial."""
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    probs = F.softmax(logits, dim=-1).cpu()
    if generators is None:
        return torch.multinomial(probs, num_samples=1)
    # one draw per row from the row's own generator; a draw is serial (the generator's
    # random stream) but rows are independent, so they run on several threads
    draw = lambda i: torch.multinomial(probs[i:i + 1], 1, generator=generators[i])
    if len(generators) > 1 and torch.get_num_threads() > 1:
        return torch.cat(list(_sampling_pool().map(draw, range(len(generators)))))
    return torch.cat([draw(i) for i in range(len(generators))])


_POOL = None


def _sampling_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix='sampling')
    return _POOL
