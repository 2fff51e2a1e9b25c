import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, 'tests', 'reference')
TINY = os.path.join(REF, 'tiny-gpt2')
sys.path.insert(0, ROOT)


@pytest.fixture(scope='session')
def reference():
    with open(os.path.join(REF, 'reference_outputs.json'), encoding='utf-8') as f:
        return json.load(f)


@pytest.fixture(scope='session')
def tiny():
    from model import GPT
    return GPT.from_pretrained(TINY)


def make_random_checkpoint(path, seed=0, **config):
    """A random GPT-2 checkpoint in the Hugging Face layout, written by transformers,
    with the fixture's tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = dict(vocab_size=474, n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=473, eos_token_id=473)
    cfg.update(config)
    hf = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    hf.save_pretrained(path)
    for f in ('vocab.json', 'merges.txt'):
        shutil.copy(os.path.join(TINY, f), os.path.join(path, f))
    return hf


def run_script(*args, env=None, cwd=ROOT):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONWARNINGS='default')
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300)


def write_tokenizer_json(path):
    """tokenizer.json (byte-level BPE) made from the fixture's GPT-2 vocab.json and merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    with open(os.path.join(TINY, 'vocab.json'), encoding='utf-8') as f:
        vocab = json.load(f)
    with open(os.path.join(TINY, 'merges.txt'), encoding='utf-8') as f:
        merges = [tuple(line.split()) for line in f.read().split('\n')[1:] if line.strip()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(path, 'tokenizer.json'))


LLAMA_CLASSES = {'llama': ('LlamaConfig', 'LlamaForCausalLM'), 'mistral': ('MistralConfig', 'MistralForCausalLM'),
                 'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM')}


def make_llama_checkpoint(path, family='llama', seed=0, **config):
    """A random Llama-family checkpoint in the Hugging Face layout, written by transformers:
    grouped-query attention (6 query heads, 2 key/value heads), untied embeddings, a large
    rope_theta; the fixture's 474-token BPE as tokenizer.json."""
    import transformers
    torch.manual_seed(seed)
    cfg_cls, model_cls = (getattr(transformers, n) for n in LLAMA_CLASSES[family])
    cfg = dict(vocab_size=474, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=False,
               rms_norm_eps=1e-5, bos_token_id=473, eos_token_id=473)
    cfg.update(config)
    hf = model_cls(cfg_cls(**cfg)).eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm shows
        for name, p in hf.named_parameters():
            if 'norm' in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith('bias'):
                p.normal_(0, 0.1)
    hf.save_pretrained(path)
    write_tokenizer_json(path)
    return hf
