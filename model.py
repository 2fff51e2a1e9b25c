"""
GPT-2, written by hand in the nanoGPT manner, with a hook for the persistent memory.

  GPTConfig, CausalSelfAttention, MLP, Block, GPT   the model (transformer.py holds what
                     every family shares: the KV cache, attention with the memory hook, the
                     forward pass; decoding.py decodes with it)
  GPT.from_pretrained  a Hugging Face GPT-2 checkpoint (hub name or directory, see
                     checkpoint.py) and its tokenizer (tokenizer.py)
  random_gpt2        GPT-2's initialisation, for benchmarks and tests without weights

The attention of a memory layer hands its q, k, v and attention weights to the layer's
memory (memory.py, where the method's equations live). The model knows nothing about FAISS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from checkpoint import (
    GGUF_PACKAGES,
    block_indices,
    check_finite,
    check_shape,
    gpt2_checkpoint,
    read_json,
    tensor_shapes,
)
from configurator import UserError
from tokenizer import load_tokenizer
from transformer import Pass, Transformer, attend, pre_norm_block


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


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.memory = None  # a memory.LayerMemory, attached by GPT.attach_memory

    def forward(self, x, *, rope=None, cache=None, rerun=False, last_only=False, how=Pass()):
        """x: (B, T, C), the T newest positions; the keywords as in transformer.attend.
        Returns y, (k, v) of all positions, att."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y, present, att = attend(self.memory, q, k, v, rope=rope, cache=cache, rerun=rerun, last_only=last_only,
                                 how=how)  # rope: None in GPT-2
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

    def forward(self, x, *, rope=None, cache=None, rerun=False, last_only=False, how=Pass()):
        return pre_norm_block(x, self.ln_1, self.attn, self.ln_2, self.mlp, rope=rope, cache=cache, rerun=rerun,
                              last_only=last_only, how=how)


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
    def from_pretrained(cls, init_from: str) -> tuple[GPT, object]:
        """Load a GPT-2 checkpoint (hub name or directory). Returns (model, tokenizer).
        run.load_pretrained takes every init_from (GPT-2, the Llama family, GGUF files)."""
        if init_from in GGUF_PACKAGES or init_from.endswith('.gguf'):
            raise UserError(f"init_from={init_from!r} is a GGUF model (Llama family), not GPT-2; load it with "
                            f"run.load_pretrained({init_from!r}), which takes every init_from the configs take")
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        ckpt_dir = gpt2_checkpoint(init_from)
        config_file = os.path.join(ckpt_dir, 'config.json')
        hf = read_json(config_file)
        act = hf.get('activation_function', 'gelu_new')
        if hf.get('model_type', 'gpt2') != 'gpt2' or act not in ('gelu_new', 'gelu_pytorch_tanh'):
            raise UserError(f"{ckpt_dir}/config.json describes a {hf.get('model_type')} model with "
                            f"activation {act}; only GPT-2 checkpoints are supported")
        fields = ('n_positions', 'vocab_size', 'n_layer', 'n_head', 'n_embd')
        bad = [k for k in fields if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool) or hf[k] < 1]
        if bad or hf['n_embd'] % hf['n_head']:
            raise UserError(f"{config_file} lacks or has bad values for {', '.join(bad) or 'n_embd / n_head'}; "
                            f"a GPT-2 config needs whole numbers {', '.join(fields)} (n_embd divisible by n_head)")
        eps = hf.get('layer_norm_epsilon', 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise UserError(f"{config_file}: layer_norm_epsilon={eps!r} must be a number between 0 and 1")
        config = GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                           n_head=hf['n_head'], n_embd=hf['n_embd'], layer_norm_epsilon=float(eps))
        check_gpt2_shapes(config, tensor_shapes([os.path.join(ckpt_dir, 'model.safetensors')]), ckpt_dir)
        model = cls(config)  # only now: the config matches the weights the file holds
        try:
            sd_hf = load_file(os.path.join(ckpt_dir, 'model.safetensors'))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{ckpt_dir}/model.safetensors cannot be read ({e}); the checkpoint is truncated or "
                            f"damaged: download or copy it again") from None
        sd_hf = {k.removeprefix('transformer.'): v for k, v in sd_hf.items()
                 if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
        check_finite(sd_hf, f"{ckpt_dir}/model.safetensors")
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
        enc = load_tokenizer(ckpt_dir)
        if enc.max_token_value >= config.vocab_size:
            raise UserError(f"{ckpt_dir}: the tokenizer has ids up to {enc.max_token_value}, the model's vocabulary "
                            f"{config.vocab_size}; vocab.json does not belong to these weights")
        return model, enc


def check_gpt2_shapes(config: GPTConfig, shapes: dict, where: str) -> None:
    """config.json against the tensors model.safetensors holds (names and shapes from its
    header), before anything is allocated: the number of blocks and the embeddings' sizes."""
    shapes = {k.removeprefix('transformer.'): v for k, v in shapes.items()}
    blocks = block_indices(shapes, 'h.')
    if blocks != set(range(config.n_layer)):
        raise UserError(f"{where}: config.json says n_layer={config.n_layer}, model.safetensors holds "
                        f"{len(blocks)} blocks; the config does not describe these weights")
    for name in ('wte.weight', 'wpe.weight'):
        if name not in shapes:
            raise UserError(f"{where}: model.safetensors lacks {name}; it does not hold GPT-2 weights")
    check_shape(shapes, 'wte.weight', (config.vocab_size, config.n_embd), where, 'vocab_size and n_embd')
    check_shape(shapes, 'wpe.weight', (config.block_size, config.n_embd), where, 'n_positions and n_embd')
    check_shape(shapes, 'h.0.attn.c_attn.weight', (config.n_embd, 3 * config.n_embd), where, 'n_embd')


def random_gpt2(config: GPTConfig | None = None, seed: int = 0, sharpen: float = 1.0) -> GPT:
    """A GPT-2 with GPT-2's initialisation (weight matrices and embeddings normal(0, 0.02),
    biases 0, layer norms 1; GPT-2 small's shapes by default), its query weights scaled by
    `sharpen` so that attention is less uniform than at initialisation. For benchmarks."""
    torch.manual_seed(seed)
    model = GPT(config or GPTConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'ln_' in name:
                torch.nn.init.ones_(p) if name.endswith('weight') else torch.nn.init.zeros_(p)
            elif name.endswith('bias'):
                torch.nn.init.zeros_(p)
            else:
                torch.nn.init.normal_(p, 0.0, 0.02)
        C = model.config.n_embd
        for block in model.transformer.h:  # nn.Linear's weight is (3C, C): its first C rows make q
            block.attn.c_attn.weight[:C] *= sharpen
    model.name = f'random-gpt2-seed{seed}'
    return model.eval()
