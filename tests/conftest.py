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
