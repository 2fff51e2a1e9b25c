"""
GPT-2, written by hand in the nanoGPT manner, with a hook for the persistent memory.

Read top to bottom:
  1. loading a Hugging Face GPT-2 checkpoint (hub name or local directory) and its tokenizer
  2. the model: attention (with a KV cache and the memory hook), MLP, block, GPT
  3. generation (nanoGPT sampling; exact decoding when a memory is attached)

The attention of a layer calls `self.memory.update_values(q, k, v, att)` when a memory is
attached to it (see memory.py, where the method's equations live). The model knows
nothing about FAISS.
"""

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class UserError(Exception):
    """A mistake in what the user asked for: the scripts print it as one line and exit 2."""


# -----------------------------------------------------------------------------
# 1. checkpoints and tokenizer

HUB_MODELS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
CHECKPOINT_FILES = ('config.json', 'model.safetensors', 'vocab.json', 'merges.txt')


def resolve_checkpoint(init_from):
    """Return a local directory holding CHECKPOINT_FILES for `init_from`.

    `init_from` is a local directory in the hub layout, or one of HUB_MODELS, which is
    downloaded once by huggingface_hub and then read from its cache. The cache is tried
    first, so a cached model never touches the network; HF_HUB_OFFLINE=1 is honoured.
    """
    if os.path.isdir(init_from):
        missing = [f for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(init_from, f))]
        if missing:
            raise UserError(f"checkpoint directory {init_from} lacks {', '.join(missing)}; "
                            f"it needs {', '.join(CHECKPOINT_FILES)} (the Hugging Face layout)")
        return init_from
    if init_from not in HUB_MODELS:
        raise UserError(f"init_from={init_from!r} is neither a directory nor one of {', '.join(HUB_MODELS)}; "
                        f"pass a GPT-2 name or --init_from=DIR with {', '.join(CHECKPOINT_FILES)}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    paths = []
    for fname in CHECKPOINT_FILES:
        try:
            paths.append(hf_hub_download(init_from, fname, local_files_only=True))
            continue
        except LocalEntryNotFoundError:
            pass
        try:
            paths.append(hf_hub_download(init_from, fname))
        except Exception as e:  # offline, no network, hub down: all end the same way for the user
            raise UserError(f"{init_from} is not in the Hugging Face cache and could not be downloaded "
                            f"({type(e).__name__}); connect once to cache it, or pass --init_from=DIR "
                            f"with a local checkpoint ({', '.join(CHECKPOINT_FILES)})") from None
    return os.path.dirname(paths[0])


# GPT-2's pre-tokenisation pattern (the same one tiktoken's "gpt2" encoding uses)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = '<|endoftext|>'


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


def load_tokenizer(ckpt_dir):
    """A tiktoken Encoding built from the checkpoint's vocab.json and merges.txt.

    In GPT-2's byte-level BPE a token's id is also its merge rank, which is exactly what
    tiktoken's mergeable_ranks are, so the vocabulary can be used as it is.
    """
    import tiktoken
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


def encode(enc, text):
    return enc.encode(text, allowed_special={EOT} & enc.special_tokens_set)


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


def new_gelu(x):
    """GELU as in GPT-2: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), HF's "gelu_new".
    torch's fused kernel computes this formula in one pass over memory instead of seven."""
    return F.gelu(x, approximate='tanh')


class LayerCache:
    """What one layer keeps of the positions seen so far: keys and values, plus queries and
    the memory's state (v' and a computed mask) for a memory layer in cached mode. Buffers
    are allocated once for `capacity` positions, so adding a token writes in place instead
    of copying the whole past (torch.cat would, every step)."""

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


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.memory = None  # a memory.LayerMemory, attached by GPT.attach_memory

    def forward(self, x, cache=None, use_memory=True, need_att=False, cached_memory=False, last_only=False,
                all_rows=False):
        """x: (B, T, C) for the T newest positions. cache: this layer's LayerCache, which holds
        the earlier positions and receives these. Returns y, (k, v) of all positions, and
        att (B, H, T, T_all) when asked for. last_only: y of the last position only (the
        top layer, when only the next token's logits are wanted). all_rows: y of every
        position, the cached ones too, their q, k, v taken from the cache (exact decoding's
        first memory layer, whose input for past positions never changes)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        retrieve = use_memory and self.memory is not None
        if retrieve and cache is not None and not (cached_memory or all_rows):
            raise ValueError("exact memory attention reruns the whole sequence; "
                             "a KV cache in a memory layer needs cached_memory=True")
        q_all = q
        if cache is not None:
            full = cache.extend(k=k, v=v, **(dict(q=q) if retrieve or all_rows else {}))
            k, v, q_all = full['k'], full['v'], full.get('q', q)
            if all_rows:
                q, T = q_all, q_all.size(2)
        present = (k, v)
        T_all = k.size(2)
        if retrieve or need_att or last_only:
            # explicit attention: the memory needs the attention weights. For the top layer, when
            # only the next token's logits are wanted, the last query row is enough (it sees
            # every position); step 4 of the method still uses every selected token's own query.
            att = ((q[:, :, -1:] if last_only else q) @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if not last_only:
                causal = torch.ones(T, T_all, dtype=torch.bool, device=x.device).tril(diagonal=T_all - T)
                att = att.masked_fill(~causal, float('-inf'))
            att = F.softmax(att, dim=-1)
            if retrieve and cached_memory and cache is not None:
                v = self.memory.cached_values(q_all, k, v, att, *cache.memory_state(v, T_all))
            elif retrieve:
                v = self.memory.update_values(q, k, v, att)
            y = att @ v
        else:
            att = None
            if T == 1 or T == T_all:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            else:  # several new positions after a cache: causal mask aligned to the end
                causal = torch.ones(T, T_all, dtype=torch.bool, device=x.device).tril(diagonal=T_all - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        y = y.transpose(1, 2).contiguous().view(B, y.size(2), C)
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

    def forward(self, x, cache=None, use_memory=True, need_att=False, cached_memory=False, last_only=False,
                all_rows=False):
        """all_rows: x holds every position, but those already in the cache are not projected again."""
        h = self.ln_1(x[:, cache.length:] if all_rows else x)
        a, present, att = self.attn(h, cache, use_memory, need_att, cached_memory, last_only, all_rows)
        x = (x[:, -1:] if last_only else x) + a
        x = x + self.mlp(self.ln_2(x))
        return x, present, att


class GPT(nn.Module):

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

    # --- loading -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, init_from):
        """Load a GPT-2 checkpoint (hub name or directory). Returns (model, tokenizer)."""
        from safetensors.torch import load_file
        ckpt_dir = resolve_checkpoint(init_from)
        with open(os.path.join(ckpt_dir, 'config.json'), encoding='utf-8') as f:
            hf = json.load(f)
        act = hf.get('activation_function', 'gelu_new')
        if hf.get('model_type', 'gpt2') != 'gpt2' or act not in ('gelu_new', 'gelu_pytorch_tanh'):
            raise UserError(f"{ckpt_dir}/config.json describes a {hf.get('model_type')} model with "
                            f"activation {act}; only GPT-2 checkpoints are supported")
        config = GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                           n_head=hf['n_head'], n_embd=hf['n_embd'],
                           layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-5))
        model = cls(config)
        sd_hf = load_file(os.path.join(ckpt_dir, 'model.safetensors'))
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
        model.name = init_from if init_from in HUB_MODELS else os.path.basename(os.path.normpath(init_from))
        model.eval()
        return model, load_tokenizer(ckpt_dir)

    def fingerprint(self):
        """A short hash of the weights: every tensor's name and shape, and a strided sample of its values.
        Memories record it, so a memory is never used with a model it was not built by."""
        h = hashlib.sha256()
        for name, p in self.state_dict().items():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(flat[::step].to('cpu', torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]

    # --- memory ----------------------------------------------------------------

    def attach_memory(self, memory):
        """Give each memory layer its LayerMemory (memory=None detaches all)."""
        for i, block in enumerate(self.transformer.h):
            block.attn.memory = memory.layers.get(i) if memory is not None else None

    def memory_layers(self):
        return [i for i, b in enumerate(self.transformer.h) if b.attn.memory is not None]

    # --- forward ---------------------------------------------------------------

    def new_cache(self):
        """An empty KV cache for forward(): one LayerCache per layer."""
        return [LayerCache(self.config.block_size) for _ in range(self.config.n_layer)]

    def forward(self, idx, cache=None, use_memory=True, return_att=False, all_logits=False,
                start_layer=0, hidden=None, stop_layer=None, pos_start=None, cached_memory=False,
                start_cache=None):
        """idx: (B, T) token ids of the newest T positions.

        cache: from new_cache(); it holds the keys and values of the earlier positions and
        receives these. Returns (logits, kv, atts): logits of the last position (B, 1, V), or
        of every position with all_logits; kv: per layer (k, v) of all positions; atts: per
        layer attention weights (B, H, T, T_all) with return_att.

        start_layer/hidden/stop_layer run a slice of the stack: `hidden` is the input of
        `start_layer`; with stop_layer the output is the hidden state entering that layer.
        pos_start: position of idx's first token (default: the cache's length).
        cached_memory: memory layers keep a KV cache too (the approximate cached mode, see generate).
        start_cache: with `hidden`, a LayerCache of start_layer's q, k, v for the positions whose
        input has not changed since it was filled; only the others are projected (exact decoding).
        """
        if hidden is None:
            B, T = idx.size()
            past = pos_start if pos_start is not None else (cache[start_layer].length if cache else 0)
            if past + T > self.config.block_size:
                raise ValueError(f"cannot forward {past + T} positions, block size is {self.config.block_size}")
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        else:
            x = hidden
        kv, atts = [], []
        top = self.config.n_layer if stop_layer is None else stop_layer
        for i in range(start_layer, top):
            # the top layer's other positions feed nothing when only the last logits are wanted
            last_only = stop_layer is None and i == top - 1 and not (all_logits or return_att)
            all_rows = i == start_layer and start_cache is not None
            layer_cache = start_cache if all_rows else cache[i] if cache else None
            x, present, att = self.transformer.h[i](x, layer_cache, use_memory, return_att, cached_memory, last_only,
                                                    all_rows)
            kv.append(present)
            atts.append(att)
        if stop_layer is not None:
            return x, kv, atts
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x if all_logits else x[:, [-1], :])
        return logits, kv, atts

    # --- generation ------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generators=None, progress=None,
                 mode='exact', forced=None, logits_out=None):
        """Continue each row of idx (B, T) by max_new_tokens sampled tokens (nanoGPT semantics).

        generators: one torch.Generator per row (CPU), so row i draws exactly what a run of
        its own would; None uses torch's global generator (as nanoGPT). Sampling happens on
        the CPU, so a CUDA run draws the same tokens as a CPU run from the same probabilities.

        mode='exact' (the default) is the method's decoding: a memory layer changes the
        values of past tokens, and its selection depends on the newest token, so every layer
        from the first memory layer on is rerun over the whole sequence for each new token
        (METHOD.md section 2). Layers before it are unaffected and use a KV cache.

        mode='cached' is an approximation whose cost per token does not grow with the
        context: every layer keeps an ordinary KV cache, so past positions keep the states
        they had; a memory layer selects from the new token's attention row and attends
        with memory-updated values for the selected past tokens-heads (each computed once).
        The prompt pass and so the first generated token are the same as in exact mode.

        forced: (B, max_new_tokens) tokens to feed instead of sampling (teacher forcing);
        logits_out: a list that receives each step's last-position logits (B, V).
        """
        if mode not in ('exact', 'cached'):
            raise ValueError(f"mode={mode!r}: use 'exact' or 'cached'")
        cached = mode == 'cached'
        n_layer, block_size = self.config.n_layer, self.config.block_size
        # layers below `split` run once per token with a KV cache; layers from `split` on are
        # rerun over the whole sequence (exact mode with a memory only)
        split = n_layer if cached else min(self.memory_layers(), default=n_layer)
        if idx.size(1) > block_size:
            warnings.warn(f"prompt of {idx.size(1)} tokens is longer than block_size {block_size}; "
                          f"only its last {block_size} tokens are used")
        cache, mid = None, None  # KV cache of layers < split, hidden states entering `split`
        for step in range(max_new_tokens):
            if cache is None:
                # (re)start: a full pass over the (cropped) context
                cache = self.new_cache()
                split_cache = LayerCache(block_size)  # layer `split`'s q, k, v: its input never changes
                mid, _, _ = self(idx[:, -block_size:], cache=cache, stop_layer=split, cached_memory=cached)
            else:
                new, _, _ = self(idx[:, -1:], cache=cache, stop_layer=split, pos_start=idx.size(1) - 1,
                                 cached_memory=cached)
                mid = torch.cat((mid, new), dim=1) if split < n_layer else new
            if idx.size(1) >= block_size:
                cache = None  # the window slides from the next token on: positions shift, no cache
            if split < n_layer:
                logits, _, _ = self(None, hidden=mid, start_layer=split, start_cache=split_cache)
            else:
                logits = self.lm_head(self.transformer.ln_f(mid[:, [-1], :]))
            if logits_out is not None:
                logits_out.append(logits[:, -1, :].float().cpu())
            if forced is not None:
                idx_next = forced[:, step:step + 1]
            else:
                idx_next = sample_next(logits[:, -1, :], temperature, top_k, generators)
            idx = torch.cat((idx, idx_next.to(idx.device)), dim=1)
            if progress is not None:
                progress.update(1)
        return idx


def sample_next(logits, temperature, top_k, generators=None):
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
