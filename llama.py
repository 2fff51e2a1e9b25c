"""
Llama-family decoders (Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2), written by hand
beside GPT-2. They share transformer.py's core (the memory hook, the KV cache, attention with
rotary embeddings and grouped-query attention); only the architecture is here.

Read top to bottom:
  1. config: LlamaConfig, from a Hugging Face config.json (a GGUF file's: gguf_file.py)
  2. the model: RMSNorm, rotary embeddings, attention, SwiGLU MLP, block, Llama
  3. loading: a Hugging Face directory (config.json, safetensors, sharded or not,
     tokenizer.json; checkpoint.py finds them) or a GGUF file (gguf_file.py reads it)

The memory on these models (docs/method.md section 8) lives in memory.py like GPT-2's: stored per
key/value head, keys before RoPE by default.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from checkpoint import LLAMA_FAMILIES as FAMILIES
from checkpoint import block_indices, check_finite, check_shape, read_json, safetensors_files, tensor_shapes
from configurator import UserError
from gguf_file import read_gguf
from tokenizer import load_hf_tokenizer
from transformer import Pass, Transformer, attend, pre_norm_block

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

    def check(self, shapes: dict, where: str) -> None:
        """Every field in range, and against the tensors the files hold ({name: shape}, Hugging
        Face names), before anything is allocated: blocks, embeddings, heads, MLP width."""
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'head_dim',
                     'intermediate_size'):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{where}: {name}={v!r} must be a whole number >= 1; the checkpoint's config is damaged")
        for name, top in (('rope_theta', float('inf')), ('rms_norm_eps', 1.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < top:
                raise UserError(f"{where}: {name}={v!r} must be a number above 0" + (" and below 1" if top == 1 else ''))
        if self.n_head % self.n_kv_head or self.head_dim % 2:
            raise UserError(f"{where}: {self.n_head} query heads over {self.n_kv_head} key/value heads of size "
                            f"{self.head_dim}: the query heads must be a multiple of the key/value heads, the size even")
        if self.rope_scaling is not None and not (isinstance(self.rope_scaling, dict) and all(
                isinstance(self.rope_scaling.get(k), (int, float)) and self.rope_scaling[k] > 0
                for k in ('factor', 'original_max_position_embeddings'))):
            raise UserError(f"{where}: rope scaling {str(self.rope_scaling)[:80]} needs positive 'factor' and "
                            f"'original_max_position_embeddings'")
        blocks = block_indices(shapes, 'model.layers.')
        if blocks != set(range(self.n_layer)):
            raise UserError(f"{where}: the config says {self.n_layer} layers, the weights hold {len(blocks)} blocks; "
                            f"the config does not describe these weights")
        if 'model.embed_tokens.weight' not in shapes:
            raise UserError(f"{where}: the weights lack model.embed_tokens.weight; they are not a Llama-family model's")
        C, d = self.n_embd, self.head_dim
        check_shape(shapes, 'model.embed_tokens.weight', (self.vocab_size, C), where, 'vocab_size and hidden_size')
        check_shape(shapes, 'model.layers.0.self_attn.q_proj.weight', (self.n_head * d, C), where, 'the heads and their size')
        check_shape(shapes, 'model.layers.0.self_attn.k_proj.weight', (self.n_kv_head * d, C), where,
                    'the key/value heads and their size')
        check_shape(shapes, 'model.layers.0.mlp.gate_proj.weight', (self.intermediate_size, C), where, 'intermediate_size')

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

    def forward(self, x, *, rope, cache=None, rerun=False, last_only=False, how=Pass()):
        """As model.CausalSelfAttention.forward; q and k are rotated inside transformer.attend."""
        B, T, _ = x.size()
        H, H_kv, d = self.shape
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, H_kv, d).transpose(1, 2)  # (B, H_kv, T, d)
        v = self.v_proj(x).view(B, T, H_kv, d).transpose(1, 2)
        y, present, att = attend(self.memory, q, k, v, rope=rope, cache=cache, rerun=rerun, last_only=last_only,
                                 how=how)
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

    def forward(self, x, *, rope=None, cache=None, rerun=False, last_only=False, how=Pass()):
        return pre_norm_block(x, self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp,
                              rope=rope, cache=cache, rerun=rerun, last_only=last_only, how=how)


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
        config = LlamaConfig.from_hf(hf, os.path.join(ckpt_dir, 'config.json'))
        files = safetensors_files(ckpt_dir)
        config.check(tensor_shapes(files), ckpt_dir)
        model = cls(config)  # only now: the config matches the weights the files hold
        tensors = {}
        for f in files:
            try:
                tensors.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise UserError(f"{f} cannot be read ({e}); the checkpoint is truncated or damaged") from None
        check_finite(tensors, ckpt_dir)
        model.load_weights({k: v.float() for k, v in tensors.items()}, ckpt_dir)
        model.name = name or os.path.basename(os.path.normpath(ckpt_dir))
        return model, load_hf_tokenizer(ckpt_dir)

    @classmethod
    def from_gguf(cls, path, name=None):
        """Load a GGUF file (llama.cpp's format, see gguf_file.py). Returns (model, tokenizer)."""
        fields, tensors, tokenizer = read_gguf(path, check=lambda fields, shapes: LlamaConfig(**fields).check(shapes, path))
        model = cls(LlamaConfig(**fields))
        model.load_weights(tensors, path)
        model.name = name or os.path.splitext(os.path.basename(path))[0]
        return model, tokenizer
