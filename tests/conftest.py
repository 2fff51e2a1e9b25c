import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, 'tests', 'reference')
TINY = os.path.join(REF, 'tiny-gpt2')
sys.path.insert(0, ROOT)
TINY_ARG = f'--init_from={TINY}'
TEXT = "\nCats are curious animals that sleep for most of the day and play at night."  # a memory text
WORDS = "cats are kind and the city of Vancouver is large while dogs play in the park every day ".split()


@pytest.fixture(scope='session')
def reference():
    with open(os.path.join(REF, 'reference_outputs.json'), encoding='utf-8') as f:
        return json.load(f)


@pytest.fixture(scope='session')
def tiny():
    from model import GPT
    return GPT.from_pretrained(TINY)


def one_line_error(r, *fragments):
    """r (from run_script) failed with exit status 2 and one line, 'error: ...', holding every fragment."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(('building', 'generating',
                                                                                  'settings', 'sweep '))]
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def write_docs(folder, lengths):
    """A folder of documents doc0.txt, doc1.txt, ... of the given lengths in words."""
    folder.mkdir()
    for i, n in enumerate(lengths):
        (folder / f"doc{i}.txt").write_text(' '.join(WORDS[(i + j) % len(WORDS)] for j in range(n)), encoding='utf-8')
    return folder


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


def run_script(*args, env=None, cwd=ROOT, fresh=False):
    """Run one of the project's scripts as a user would; returns (returncode, stdout, stderr)
    like subprocess.run. A project script without `env` runs in this process (run_main): the
    same main, errors and exit codes, without a new interpreter importing torch again; with
    env, fresh=True or anything else (python -c ...), a new process."""
    script = os.path.join(ROOT, args[0]) if args and not os.path.isabs(args[0]) else (args[0] if args else '')
    if env is None and not fresh and script.endswith('.py') and os.path.dirname(script) == ROOT and \
            os.path.isfile(script):
        return run_main(script, *args[1:], cwd=cwd)
    full_env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONWARNINGS='default')
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300)


def run_main(script, *argv, cwd=ROOT):
    """A script's main(argv) under configurator.run_cli, in this process: its stdout, stderr and
    exit status (2 for a UserError, 1 and the traceback for anything unexpected)."""
    import contextlib
    import importlib.util
    import io
    import traceback
    import warnings

    from configurator import run_cli
    name = os.path.splitext(os.path.basename(script))[0]
    module = sys.modules.get(f'script_{name}')
    if module is None:
        spec = importlib.util.spec_from_file_location(f'script_{name}', script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f'script_{name}'] = module
        spec.loader.exec_module(module)
    out, err, code = io.StringIO(), io.StringIO(), 0
    old_argv, old_cwd, old_format = sys.argv, os.getcwd(), warnings.formatwarning
    # a file written to /dev/stdout (--out_jsonl=/dev/stdout) would bypass the captured stdout:
    # it goes to a file whose text is added after what was printed (where a new process puts it)
    fd, stdout_file = tempfile.mkstemp(suffix='.stdout')
    os.close(fd)
    argv = [a.replace('/dev/stdout', stdout_file) for a in argv]
    try:
        os.chdir(cwd)
        sys.argv = [script, *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter('always')  # each run warns afresh, as each new process would
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            try:
                run_cli(module.main)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, warnings.formatwarning = old_argv, old_format
        os.chdir(old_cwd)
        with open(stdout_file, encoding='utf-8') as f:
            written = f.read()
        os.remove(stdout_file)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue() + written, err.getvalue())


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
