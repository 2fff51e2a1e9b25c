"""Files from elsewhere, table by table: saved index files that do not belong to the keys
beside them (never searched: a warning and a rebuild), calibration claims that are false or
malformed, appends whose settings differ from the memory's, outputs aimed into a memory
directory, FAISS factory strings FAISS cannot run, and two appends at once."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save

import files
from conftest import ROOT, TINY, TINY_ARG, one_line_error, run_script
from knn_index import KNNIndex
from memory import RetrievalSettings
from model import GPT
from store import load_memory

SETTINGS = RetrievalSettings([0, 5, 5, 0], 0.0, 0.0, 1.0, False, 0.0)


@pytest.fixture(scope='module')
def ivf_memory(tmp_path_factory):
    """A memory of layers 1 and 2 with saved IVF indexes (a pristine copy: each case copies it)."""
    store = tmp_path_factory.mktemp('hostile') / 'mem'
    text = open(os.path.join(ROOT, 'data', 'vancouver.txt'), encoding='utf-8').read() * 2
    (store.parent / 'text.txt').write_text(text, encoding='utf-8')
    r = run_script('build_memory.py', str(store.parent / 'text.txt'), TINY_ARG, f'--mem_store={store}',
                   '--layers=[1,2]', '--knn_index=ivf')
    assert r.returncode == 0 and 'trained and saved' in r.stdout, r.stderr
    return store


def index_file(store, layer):
    return next(store / f for f in os.listdir(store) if f.startswith('index-') and f.split('-')[2] == str(layer))


def read_index(path):
    with safe_open(str(path), 'np') as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def write_index(store, path, heads, meta, record=True, seal=True):
    """Put an index file in place; record=True also puts its checksum in the manifest, as an
    attacker who can edit the manifest would, and seal=True its seal under this machine's key
    (an attacker who can read that key, or a run with trust_saved_index=True): what the checks
    behind the seal must still catch."""
    data = save(heads, meta)
    path.write_bytes(data)
    if record:
        manifest = json.loads((store / 'memory.json').read_text())
        digest = hashlib.sha256(data).hexdigest()
        manifest.setdefault('indexes', {})[path.name] = digest
        manifest.setdefault('index_seals', {})[path.name] = files.seal(digest) if seal else 'f' * 64
        (store / 'memory.json').write_text(json.dumps(manifest))


def swap_layers(store, record):
    one, two = index_file(store, 1), index_file(store, 2)
    heads, meta = read_index(one)
    write_index(store, two, heads, meta, record)


def other_keys(store, how, seal=True):
    """An index over other keys of the same shape: random ones, or the right ones with every
    id shifted by one row."""
    path = index_file(store, 2)
    _, meta = read_index(path)
    keys = load_memory(str(store)).keys[2].clone()
    keys = torch.randn_like(keys) * keys.std() if how == 'random' else keys.roll(1, dims=1)
    heads, calibration = KNNIndex(keys, 'faiss', 'ivf').serialized()
    write_index(store, path, heads, dict(meta, **calibration), seal=seal)


def flip_bytes(store):
    path = index_file(store, 2)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data), 7):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def calibration(store, value):
    path = index_file(store, 2)
    heads, meta = read_index(path)
    write_index(store, path, heads, dict(meta, calibration=value))


def lying_header(store, what):
    """Every head's bytes with a header that lies (a count of 2^40 keys, or another index type),
    the manifest edited to record the file: FAISS must never read them."""
    import struct
    path = index_file(store, 2)
    heads, meta = read_index(path)
    for name, h in heads.items():
        b = bytearray(h.tobytes())
        if what == 'count':
            b[8:16] = struct.pack('<q', 1 << 40)
        else:
            b[:4] = b'IxLS'
        heads[name] = np.frombuffer(bytes(b), dtype=h.dtype)
    write_index(store, path, heads, meta)


def unrecorded(store):
    manifest = json.loads((store / 'memory.json').read_text())
    del manifest['indexes']
    (store / 'memory.json').write_text(json.dumps(manifest))


CASES = {
    'layer 1 file in place of layer 2': (lambda s: swap_layers(s, False), 'does not match the checksum'),
    'layer 1 file in place of layer 2, manifest edited': (lambda s: swap_layers(s, True), 'was saved for other keys'),
    'an index over other keys of the same shape': (lambda s: other_keys(s, 'random'), 'not built over these keys'),
    'an index over other keys, recorded, sealed elsewhere': (lambda s: other_keys(s, 'random', seal=False),
                                                             'was not saved on this machine'),
    'ids shifted by one row': (lambda s: other_keys(s, 'shifted'), 'not built over these keys'),
    'bytes flipped across half the file': (flip_bytes, 'does not match the checksum'),
    'calibration a string': (lambda s: calibration(s, '"fast"'), 'not one entry per head'),
    'calibration zero': (lambda s: calibration(s, '0'), 'not one entry per head'),
    'calibration nprobe 0': (lambda s: calibration(s, json.dumps([{'nprobe': 0, 'recall': 1.0}] * 4)), 'is not'),
    'calibration nprobe 1e300': (lambda s: calibration(s, json.dumps([{'nprobe': 1e300, 'recall': 1.0}] * 4)), 'is not'),
    'calibration recall negative': (lambda s: calibration(s, json.dumps([{'nprobe': 1, 'recall': -1}] * 4)), 'is not'),
    'calibration without its fields': (lambda s: calibration(s, json.dumps([{}] * 4)), 'is not'),
    'calibration not JSON': (lambda s: calibration(s, '[{'), 'not JSON'),
    'a file the manifest does not record': (unrecorded, 'does not record it'),
    'a header declaring 2^40 keys, manifest edited': (lambda s: lying_header(s, 'count'), 'declares 1099511627776 keys'),
    'an index type this code does not build, manifest edited': (lambda s: lying_header(s, 'type'), "starts b'IxLS'"),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_a_saved_index_that_does_not_belong_is_never_searched(ivf_memory, tmp_path, case):
    store = tmp_path / 'mem'
    shutil.copytree(ivf_memory, store)
    spoil, message = CASES[case]
    spoil(store)
    before = {f: (store / f).read_bytes() for f in os.listdir(store)}
    model, enc = GPT.from_pretrained(TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        layer = load_memory(str(store), model, enc).retrieving_layers(SETTINGS)[2]
    said = [str(w.message) for w in caught]
    assert said and all(message in m and 'building the index again' in m for m in said), said
    assert len(said) == (2 if case == 'a file the manifest does not record' else 1), said  # one per layer spoiled
    keys = layer.keys
    queries = keys[:, ::5].reshape(-1, keys.size(-1))
    heads = torch.arange(keys.size(0)).repeat_interleave(keys[:, ::5].size(1))
    fresh = KNNIndex(keys, 'faiss', 'ivf')
    assert torch.equal(layer.index.search(queries, heads, 5), fresh.search(queries, heads, 5))
    assert {f: (store / f).read_bytes() for f in os.listdir(store)} == before  # loading never writes


def test_a_memory_from_another_machine_is_reindexed_unless_its_indexes_are_trusted(ivf_memory, tmp_path, monkeypatch):
    """Index files saved under another machine's key (a memory copied from elsewhere, its manifest
    recording them): FAISS does not read them, the index is built from the keys with a warning;
    trust_saved_index=True reads them; build_memory.py --reindex saves them again, sealed here."""
    store = tmp_path / 'mem'
    shutil.copytree(ivf_memory, store)
    model, enc = GPT.from_pretrained(TINY)
    monkeypatch.setenv('MEMORY_SEAL_KEY', str(tmp_path / 'another-machine.key'))
    with pytest.warns(UserWarning, match='was not saved on this machine') as caught:
        layers = load_memory(str(store), model, enc).retrieving_layers(SETTINGS)
    assert len(caught) == 2 and not any(lm.index.from_saved for lm in layers.values())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        trusted = load_memory(str(store), model, enc, trust_saved_index=True).retrieving_layers(SETTINGS)
    assert all(lm.index.from_saved for lm in trusted.values())
    r = run_script('build_memory.py', f'--reindex={store}', '--knn_index=ivf')  # under the other key still
    assert r.returncode == 0, r.stderr
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert all(lm.index.from_saved for lm in load_memory(str(store), model, enc).retrieving_layers(SETTINGS).values())


def test_a_false_calibration_claim_is_measured_and_replaced(ivf_memory, tmp_path):
    """A file claiming recall 0.99 at nprobe 1 over keys where nprobe 1 finds far less: the claim
    is measured on a sample, found false, and the head is calibrated again (and the record says so)."""
    torch.manual_seed(1)
    keys = torch.randn(2, 3000, 64)
    heads, _ = KNNIndex(keys, 'faiss', 'ivf').serialized()
    claim = json.dumps([{'nprobe': 1, 'recall': 0.99}] * 2)
    with pytest.warns(UserWarning, match=r'claims recall@10 0.990, a sample measures 0\.[0-7]'):
        index = KNNIndex(keys, 'faiss', 'ivf', saved=(heads, dict(calibration=claim)))
    assert all(f['nprobe'] > 1 and f['recall'] >= 0.95 for f in index.calibration)
    assert index.calibrated_now and 'recall@10 >= 0.9' in index.describe()


@pytest.fixture(scope='module')
def small_memory(tmp_path_factory):
    """A float16 memory of layer 2 with an HNSW index and a bookkeeping token of its own."""
    base = tmp_path_factory.mktemp('append')
    (base / 'a.txt').write_text('Cats are kind and the city is large.', encoding='utf-8')
    r = run_script('build_memory.py', str(base / 'a.txt'), TINY_ARG, f'--mem_store={base / "mem"}', '--layers=[2]',
                   '--store_dtype=float16', '--knn_index=hnsw', '--bookkeeping_token= ')
    assert r.returncode == 0, r.stderr
    return base


@pytest.mark.parametrize('option,named', [
    ('--layers=[1]', 'layers=[1]'), ('--layers=[1,2]', 'layers=[1, 2]'), ('--store_dtype=float32', "store_dtype='float32'"),
    ('--knn_index=flat', "knn_index='flat'"), ('--bookkeeping_token=\n', "bookkeeping_token='\\n'"),
    ('--memory_keys=rotated', "memory_keys='rotated'"), ('--remove_bookkeeping_token_mem_size=0', 'remove_bookkeeping_token_mem_size=0')])
def test_an_append_with_other_settings_than_the_memory_is_refused(small_memory, tmp_path, option, named):
    store = tmp_path / 'mem'
    shutil.copytree(small_memory / 'mem', store)
    before = {f: (store / f).read_bytes() for f in os.listdir(store)}
    (tmp_path / 'b.txt').write_text('Dogs play in the park every day.', encoding='utf-8')
    r = run_script('build_memory.py', str(tmp_path / 'b.txt'), TINY_ARG, f'--mem_store={store}', '--append=True', option)
    one_line_error(r, f'append=True: {named} differs from the memory', 'leave')
    assert {f: (store / f).read_bytes() for f in os.listdir(store)} == before
    # the memory's own settings, given or left out, append
    r = run_script('build_memory.py', str(tmp_path / 'b.txt'), TINY_ARG, f'--mem_store={store}', '--append=True',
                   '--layers=[2]', '--store_dtype=float16')
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('script,option', [('sample.py', '--out_jsonl={store}/memory.json'),
                                           ('sample.py', '--out_jsonl={store}/runs/samples.jsonl'),
                                           ('sweep.py', '--out_dir={store}'), ('logit_lens.py', '--out_dir={store}/lens'),
                                           ('retrieval_trace.py', '--out_dir={store}'),
                                           ('attention_maps.py', '--out_dir={store}/maps')])
def test_outputs_are_never_written_into_a_memory_directory(small_memory, tmp_path, script, option):
    store = tmp_path / 'mem'
    shutil.copytree(small_memory / 'mem', store)
    before = sorted(p.relative_to(store) for p in store.rglob('*'))
    r = run_script(script, TINY_ARG, '--knn_num=[0,0,5,0]', "--memory=\nCats.", '--max_new_tokens=1', '--seeds=[1]',
                   option.format(store=store))
    one_line_error(r, 'is inside the memory directory', str(store))
    assert sorted(p.relative_to(store) for p in store.rglob('*')) == before
    r = run_script('build_memory.py', str(small_memory / 'a.txt'), TINY_ARG, f'--mem_store={store}/inner')
    one_line_error(r, 'is inside the memory directory')


@pytest.mark.parametrize('factory', ['HNSW1', 'HNSW0', 'PQ16x0', 'NSG0', 'IDMap,Flat', 'IVF0,Flat', 'PCA0,Flat',
                                     'IVF4,PQ16x0', 'IVF4,PQ5', 'HNSW32,PQ4', 'LSH', 'IVF4_HNSW0,Flat',
                                     'IVF4_NSG8,Flat'])
def test_factory_strings_faiss_cannot_run_are_refused_before_faiss_sees_them(small_memory, tmp_path, factory):
    """Each of these crashed the process (segfault, abort, floating-point exception), hung, traced
    back or searched 1% of the neighbours; now a one-line error, in every entry point."""
    docs = small_memory / 'a.txt'
    one_line_error(run_script('build_memory.py', str(docs), TINY_ARG, f'--mem_store={tmp_path / "m"}',
                              f'--knn_index={factory}'), f'knn_index={factory!r}', 'factory strings taken')
    assert not (tmp_path / 'm').exists()
    one_line_error(run_script('sample.py', TINY_ARG, '--knn_num=[0,0,5,0]', "--memory=\nCats are kind.",
                              '--max_new_tokens=1', '--seeds=[1]', f'--knn_index={factory}'), f'knn_index={factory!r}')
    one_line_error(run_script('build_memory.py', f'--reindex={small_memory / "mem"}', f'--knn_index={factory}'),
                   f'knn_index={factory!r}')


def test_two_appends_at_once_keep_both_documents(small_memory, tmp_path):
    """The lock covers an append's read, build and commit: run together, one waits for the
    other, and the memory ends with both documents' rows (before, one was lost)."""
    store = tmp_path / 'mem'
    shutil.copytree(small_memory / 'mem', store)
    for name in ('b', 'c'):
        (tmp_path / f'{name}.txt').write_text(f'Document {name}: dogs play in the park every day.', encoding='utf-8')
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'build_memory.py'), str(tmp_path / f'{n}.txt'),
                               TINY_ARG, f'--mem_store={store}', '--append=True'], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in ('b', 'c')]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    manifest = json.loads((store / 'memory.json').read_text())
    assert sorted(d['name'] for d in manifest['documents']) == ['a.txt', 'b.txt', 'c.txt']
    assert manifest['num_entries'] == sum(d['rows'] for d in manifest['documents'])


# -----------------------------------------------------------------------------
# checkpoint metadata, checked before anything is allocated

def checkpoint_dir(tmp_path, make, edit=None, weights=None):
    """A random checkpoint made by `make` (conftest's makers) in tmp_path/<its name>, its
    config.json then changed by edit(dict) and its model.safetensors by weights(state dict)."""
    d = tmp_path / make.__name__
    make(str(d))
    if edit:
        cfg = json.loads((d / 'config.json').read_text())
        edit(cfg)
        (d / 'config.json').write_text(json.dumps(cfg))
    if weights:
        from safetensors.torch import load_file, save_file
        sd = load_file(str(d / 'model.safetensors'))
        weights(sd)
        save_file(sd, str(d / 'model.safetensors'))
    return d


def gpt2_dir(tmp_path, edit=None, weights=None):
    from conftest import make_random_checkpoint
    return checkpoint_dir(tmp_path, make_random_checkpoint, edit, weights)


def nan_weight(sd):
    sd['transformer.h.1.mlp.c_fc.weight'][3, 4] = float('nan')


GPT2_CASES = {
    'n_layer 10^6': (lambda c: c.update(n_layer=10 ** 6), None, 'config.json says n_layer=1000000, model.safetensors holds 3 blocks'),
    'n_embd 2^20': (lambda c: c.update(n_embd=2 ** 20, n_head=4), None, 'wte.weight has shape (474, 32)'),
    'n_positions 10^9': (lambda c: c.update(n_positions=10 ** 9), None, 'wpe.weight has shape (64, 32)'),
    'vocab as a string': (lambda c: c.update(vocab_size='474'), None, 'lacks or has bad values for vocab_size'),
    'negative n_head': (lambda c: c.update(n_head=-4), None, 'bad values for n_head'),
    'layer-norm epsilon negative': (lambda c: c.update(layer_norm_epsilon=-1e-5), None, 'layer_norm_epsilon=-1e-05 must be'),
    'layer-norm epsilon a string': (lambda c: c.update(layer_norm_epsilon='small'), None, "layer_norm_epsilon='small' must be"),
    'a NaN weight': (None, nan_weight, 'tensor h.1.mlp.c_fc.weight holds NaN'),
}


@pytest.mark.parametrize('case', sorted(GPT2_CASES))
def test_gpt2_checkpoints_that_lie_about_their_weights(tmp_path, case):
    edit, weights, message = GPT2_CASES[case]
    d = gpt2_dir(tmp_path, edit, weights)
    r, peak_mb = run_measured(tmp_path, 'sample.py', f'--init_from={d}', '--max_new_tokens=1', '--seeds=[1]')
    one_line_error(r, message)
    assert peak_mb < 1000, peak_mb  # nothing allocated by the lie (n_layer 10^6 took 7.5 GB before)


def run_measured(tmp_path, script, *args):
    """A script run in a fresh process, and its peak RSS in MB (its own, not its parent's; Linux)."""
    out = tmp_path / 'peak_rss'
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (pytest)
    code = (f"import runpy, sys\nsys.argv = [{script!r}, *{list(args)!r}]\n"
            f"try:\n    runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')\n"
            f"finally:\n    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            f"    open({str(out)!r}, 'w').write(hwm.split()[1])")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=ROOT), timeout=300)
    return r, int(out.read_text()) / 1024


def llama_dir(tmp_path, edit=None):
    from conftest import make_llama_checkpoint
    return checkpoint_dir(tmp_path, make_llama_checkpoint, edit)


LLAMA_CASES = {
    'num_hidden_layers 10^6': (lambda c: c.update(num_hidden_layers=10 ** 6), 'the config says 1000000 layers, the weights hold 4'),
    'hidden_size 2^20': (lambda c: c.update(hidden_size=2 ** 20), 'embed_tokens.weight has shape (474, 48)'),
    'key/value heads that do not divide': (lambda c: c.update(num_key_value_heads=4), 'multiple of the key/value heads'),
    'head_dim a string': (lambda c: c.update(head_dim='8'), "head_dim='8' must be a whole number"),
    'rope scaling without its factor': (lambda c: c.update(rope_scaling={'rope_type': 'llama3', 'low_freq_factor': 1}),
                                        "needs positive 'factor'"),
    'rope theta NaN': (lambda c: c.update(rope_theta=float('nan')), 'rope_theta=nan must be a number above 0'),
    'rms epsilon negative': (lambda c: c.update(rms_norm_eps=-1.0), 'rms_norm_eps=-1.0 must be'),
    'intermediate size wrong': (lambda c: c.update(intermediate_size=10 ** 6), 'gate_proj.weight has shape (96, 48)'),
    'a negative sliding window': (lambda c: c.update(model_type='mistral', sliding_window=-5), 'block_size=-5 must be'),
}


@pytest.mark.parametrize('case', sorted(LLAMA_CASES))
def test_llama_checkpoints_that_lie_about_their_weights(tmp_path, case):
    edit, message = LLAMA_CASES[case]
    d = llama_dir(tmp_path, edit)
    r = run_script('sample.py', f'--init_from={d}', '--max_new_tokens=1', '--seeds=[1]')
    one_line_error(r, message)


@pytest.mark.parametrize('bos,message', [(['<s>'], 'is not a token'), ('<nowhere>', "not in tokenizer.json's vocabulary")])
def test_a_damaged_tokenizer_config_is_refused(tmp_path, bos, message):
    d = llama_dir(tmp_path)
    (d / 'tokenizer_config.json').write_text(json.dumps(dict(bos_token=bos, add_bos_token=True)))
    one_line_error(run_script('sample.py', f'--init_from={d}', '--max_new_tokens=1', '--seeds=[1]'), message)


HF_TO_GGUF = {'input_layernorm': 'attn_norm', 'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
              'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output', 'post_attention_layernorm': 'ffn_norm',
              'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}


@pytest.fixture(scope='module')
def llama_tensors(tmp_path_factory):
    """A tiny Llama's tensors under llama.cpp's names (float32), and its tokenizer's tokens and merges."""
    from safetensors.torch import load_file

    from conftest import make_llama_checkpoint
    d = tmp_path_factory.mktemp('gguf_src')
    make_llama_checkpoint(str(d))
    out = {}
    for name, t in load_file(str(d / 'model.safetensors')).items():
        if name.startswith('model.layers.'):
            i, rest = name[len('model.layers.'):].split('.', 1)
            base, kind = rest.rsplit('.', 1)
            out[f'blk.{i}.{HF_TO_GGUF[base]}.{kind}'] = t.float().numpy()
        else:
            out[{'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
                 'lm_head.weight': 'output.weight'}[name]] = t.float().numpy()
    vocab = json.load(open(os.path.join(TINY, 'vocab.json'), encoding='utf-8'))
    merges = [line for line in open(os.path.join(TINY, 'merges.txt'), encoding='utf-8').read().split('\n')[1:] if line.strip()]
    return out, sorted(vocab, key=vocab.get), merges


def write_gguf(path, base_tensors, base_tokens, base_merges, **change):
    """A GGUF file of the tiny Llama; change: metadata to replace (None drops a field) or
    'edit' (a function editing the dict of arrays)."""
    import gguf
    fields = {'context_length': 128, 'embedding_length': 48, 'block_count': 4, 'feed_forward_length': 96,
              'head_count': 6, 'head_count_kv': 2, 'rope_freq_base': 1e6, 'layer_norm_rms_eps': 1e-5,
              'tokens': base_tokens, 'merges': base_merges, 'bos_token_id': 473}
    fields.update({k: v for k, v in change.items() if k != 'edit'})
    tensors = dict(base_tensors)
    if 'edit' in change:
        change['edit'](tensors)
    w = gguf.GGUFWriter(str(path), 'llama')
    for key in ('context_length', 'embedding_length', 'block_count', 'feed_forward_length'):
        if fields[key] is not None:
            w.add_uint32(f'llama.{key}', fields[key]) if isinstance(fields[key], int) else w.add_string(f'llama.{key}', str(fields[key]))
    if fields['head_count'] is not None:
        w.add_head_count(fields['head_count'])
    w.add_head_count_kv(fields['head_count_kv'])
    w.add_float32('llama.rope.freq_base', fields['rope_freq_base'])
    w.add_layer_norm_rms_eps(fields['layer_norm_rms_eps'])
    w.add_tokenizer_model('gpt2')
    w.add_token_list(fields['tokens'])
    w.add_token_types([1] * len(fields['tokens']))
    if fields['merges'] is not None:
        w.add_token_merges(fields['merges'])
    w.add_bos_token_id(fields['bos_token_id'])
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def nan_tensor(t):
    t['blk.2.ffn_up.weight'] = t['blk.2.ffn_up.weight'].copy()
    t['blk.2.ffn_up.weight'][1, 1] = float('nan')


GGUF_CASES = {
    'block_count 200000': (dict(block_count=200_000), 'the config says 200000 layers, the weights hold 4'),
    'embedding_length 2^20': (dict(embedding_length=2 ** 20), 'embed_tokens.weight has shape (474, 48)'),
    'head count 0': (dict(head_count=0), 'head_count=0'),
    'no block count': (dict(block_count=None), 'lacks llama.block_count'),
    'no head count': (dict(head_count=None), 'lacks llama.attention.head_count'),
    'context length 0': (dict(context_length=0), 'block_size=0 must be a whole number'),
    'rope base NaN': (dict(rope_freq_base=float('nan')), 'rope_theta=nan must be a number above 0'),
    'feed-forward length a string': (dict(feed_forward_length='96'), "intermediate_size='96' must be a whole number"),
    'no merges': (dict(merges=None), 'lacks tokens or merges'),
    'a merge of one token': (dict(merges=['Ġt']), 'a merge is not two tokens'),
    'duplicate tokens': (dict(tokens=None), 'repeats or has empty tokens'),
    'bos id 10^6': (dict(bos_token_id=10 ** 6), 'bos_token_id=1000000 is not one of its 474 tokens'),
    'a NaN weight': (dict(edit=nan_tensor), 'tensor blk.2.ffn_up.weight holds NaN'),
}


@pytest.mark.parametrize('case', sorted(GGUF_CASES))
def test_gguf_files_that_lie_about_their_weights(tmp_path, llama_tensors, case):
    tensors, tokens, merges = llama_tensors
    change, message = GGUF_CASES[case]
    if change.get('tokens', 0) is None:
        change = dict(tokens=tokens[:-1] + [tokens[0]])
    path = write_gguf(tmp_path / 'm.gguf', tensors, tokens, merges, **change)
    r, peak_mb = run_measured(tmp_path, 'sample.py', f'--init_from={path}', '--max_new_tokens=1', '--seeds=[1]')
    one_line_error(r, message)
    assert peak_mb < 1000, peak_mb


def test_the_tiny_gguf_itself_loads(tmp_path, llama_tensors):
    """The cases above spoil one thing each of a file that loads."""
    r = run_script('sample.py', f'--init_from={write_gguf(tmp_path / "m.gguf", *llama_tensors)}', '--max_new_tokens=2',
                   '--seeds=[1]')
    assert r.returncode == 0, r.stderr[-2000:]


# -----------------------------------------------------------------------------
# tokenizer files, builds, odd values

def tokenizer_dir(tmp_path, vocab=None, merges=None, raw_vocab=None):
    d = tmp_path / 'tok'
    shutil.copytree(TINY, d)
    if vocab is not None:
        v = json.loads((d / 'vocab.json').read_text(encoding='utf-8'))
        vocab(v)
        (d / 'vocab.json').write_text(json.dumps(v), encoding='utf-8')
    if raw_vocab is not None:
        (d / 'vocab.json').write_bytes(raw_vocab)
    if merges is not None:
        lines = (d / 'merges.txt').read_text(encoding='utf-8').split('\n')
        (d / 'merges.txt').write_text('\n'.join(merges(lines)), encoding='utf-8')
    return d


def drop_byte(v):
    del v['Ġ']


TOKENIZER_CASES = {
    'vocab.json broken': (dict(raw_vocab=b'{"a": 1,'), 'is not UTF-8 JSON'),
    'vocab.json a list': (dict(raw_vocab=b'["a", "b"]'), 'not an object of token -> whole-number id'),
    'vocab.json not UTF-8': (dict(raw_vocab=b'{"\xff": 1}'), 'is not UTF-8 JSON'),
    'ids as strings': (dict(vocab=lambda v: v.update(a='0')), 'whole-number id'),
    'two tokens one id': (dict(vocab=lambda v: v.update(zz=v['a'])), 'the same id'),
    'a byte token missing': (dict(vocab=drop_byte), 'lacks 1 of the 256 byte tokens'),
    'ids beyond the vocabulary': (dict(vocab=lambda v: v.update({'Ġzzz': 10 ** 6})), 'ids up to 1000000'),
    'a merge of one token': (dict(merges=lambda lines: lines[:2] + ['Ġt'] + lines[2:]), 'not two tokens'),
}


@pytest.mark.parametrize('case', sorted(TOKENIZER_CASES))
def test_damaged_tokenizer_files_are_refused_not_used(tmp_path, case):
    change, message = TOKENIZER_CASES[case]
    r = run_script('sample.py', f'--init_from={tokenizer_dir(tmp_path, **change)}', '--max_new_tokens=1', '--seeds=[1]')
    one_line_error(r, message)


def test_a_build_holds_few_files_open_and_clears_the_spools_of_killed_builds(tmp_path):
    """8 layers x 2 x 8 heads = 128 spool files under a limit of 100 open files (a gpt2-large
    build hit 'Too many open files'); a dead build's spool folder is removed by the next build."""
    from conftest import make_random_checkpoint
    ckpt = tmp_path / 'wide'
    make_random_checkpoint(str(ckpt), n_layer=8, n_head=8, n_embd=32)
    store = tmp_path / 'mem'
    store.mkdir()
    stale = store / '.build-999999999-abc'  # a pid no process has
    stale.mkdir()
    (stale / '1.keys.0').write_bytes(b'x' * 1000)
    (tmp_path / 't.txt').write_text('Cats are kind. ' * 40, encoding='utf-8')
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)); "
            f"sys.argv = ['build_memory.py', {str(tmp_path / 't.txt')!r}, '--init_from={ckpt}', '--mem_store={store}']; "
            f"runpy.run_path({os.path.join(ROOT, 'build_memory.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not stale.exists() and json.loads((store / 'memory.json').read_text())['layers'] == list(range(8))


@pytest.mark.parametrize('args,message', [
    (['--temperature=1e-300'], 'temperature a finite number >= 1e-4'),
    (['--knn_softmax_influence=1e308'], 'knn_softmax_influence=1e+308 must be a number from 0 to 1e+06'),
    (['--mem_frac=1e300'], 'mem_frac=1e+300 must be'),
])
def test_values_that_would_reach_sampling_as_nan_are_refused(args, message):
    r = run_script('sample.py', TINY_ARG, '--knn_num=[0,5,5,0]', "--memory=\nCats are kind.", '--max_new_tokens=1',
                   '--seeds=[1]', *args)
    one_line_error(r, message)


@pytest.mark.parametrize('script,args,message', [
    ('logit_lens.py', ['--top=-1'], 'top=-1 must be 1 to 100'), ('logit_lens.py', ['--top=1000000'], 'top=1000000'),
    ('attention_maps.py', ['--heads=[]'], 'give at least one of each'),
    ('attention_maps.py', ['--layers=[]'], 'give at least one of each'),
    ('retrieval_trace.py', ['--steps=0'], 'steps=0 must be 1 to'), ('retrieval_trace.py', ['--show=-3'], 'show=-3'),
])
def test_inspection_scripts_refuse_empty_or_absurd_choices(script, args, message):
    r = run_script(script, TINY_ARG, '--knn_num=[0,5,5,0]', "--memory=\nCats are kind.", '--seeds=[1]', *args)
    one_line_error(r, message)


def test_a_very_long_override_is_text_not_a_crash():
    r = run_script('sample.py', TINY_ARG, '--start=' + ' '.join(['cats'] * 2000) + ' (' * 200, '--max_new_tokens=1',
                   '--seeds=[1]')
    assert r.returncode in (0, 2) and 'Traceback' not in r.stderr, r.stderr[-1000:]


def test_a_reference_memory_whose_text_is_not_utf8(tmp_path):
    src = os.path.join(ROOT, 'tests', 'reference', 'legacy-memstores', 'type1_all_layers', 'memstore')
    store = tmp_path / 'memstore'
    shutil.copytree(src, store)
    (store / 'memstore.txt').write_bytes(b'\xff\xfe not text')
    r = run_script('sample.py', TINY_ARG, '--knn_num=' + json.dumps(
        [5 if str(i) in os.listdir(store / 'keyStore') else 0 for i in range(4)]),
        '--load_mem_store=True', f'--mem_store={store}', '--max_new_tokens=1', '--seeds=[1]')
    one_line_error(r, 'is not UTF-8 text')


def test_a_folder_build_whose_later_document_fails_leaves_nothing(tmp_path):
    """The error comes on its own line (the progress bar is closed first) and the new memory
    folder is removed; the same for a document removed after the folder was listed."""
    docs = tmp_path / 'docs'
    docs.mkdir()
    (docs / 'a.txt').write_text('Good text about cats and the city.', encoding='utf-8')
    (docs / 'b.txt').write_bytes(b'\xff\xfe not text')
    r = run_script('build_memory.py', str(docs), TINY_ARG, f'--mem_store={tmp_path / "m"}')
    one_line_error(r, 'b.txt is not UTF-8 text')
    assert not (tmp_path / 'm').exists()
    from build import build_documents
    model, enc = GPT.from_pretrained(TINY)
    with pytest.raises(Exception, match='does not exist') as e:
        build_documents(model, enc, [('a.txt', str(docs / 'a.txt')), ('gone.txt', str(docs / 'gone.txt'))],
                        str(tmp_path / 'm2'), progress=False)
    assert type(e.value).__name__ == 'UserError' and not (tmp_path / 'm2').exists()


@pytest.mark.parametrize('content', [b'not,a,summary\n1,2,3\n', b'\xff\xfe', b'setting_index,label,method,setting,seeds\n0,x,memory,{bad json,50\n',
                                     b'setting_index,label,method,setting,seeds,compound_median\n0,x,memory,{},50,lots\n'])
def test_layer_map_refuses_a_damaged_summary(tmp_path, content):
    (tmp_path / 'scan').mkdir()
    (tmp_path / 'scan' / 'summary.csv').write_bytes(content)
    r = run_script('layer_map.py', f'--sentiment={tmp_path / "scan"}', f'--out={tmp_path / "map.png"}')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and r.stderr.startswith('error: '), r.stderr[-500:]
    assert not (tmp_path / 'map.png').exists()


def _edit_tokenizer(d, edit):
    path = d / 'tokenizer.json'
    data = json.loads(path.read_text(encoding='utf-8'))
    edit(data['model'])
    path.write_text(json.dumps(data), encoding='utf-8')


TOKENIZER_JSON_CASES = {
    'a merge of one token': (lambda m: m['merges'].__setitem__(0, ['Ġ']), 'is not two tokens'),
    'a merge of tokens not in the vocab': (lambda m: m['merges'].__setitem__(3, ['zz', 'qq']), 'merge 3 (\'zz qq\') joins'),
    'a byte token missing': (lambda m: m['vocab'].pop('!'), 'lacks 1 of the 256 byte tokens'),
    'two tokens one id': (lambda m: m['vocab'].__setitem__('!', m['vocab']['"']), 'gives two tokens the same id'),
    'an id as a string': (lambda m: m['vocab'].__setitem__('!', '3'), 'not an object of token -> whole-number id'),
}


@pytest.mark.parametrize('case', sorted(TOKENIZER_JSON_CASES))
def test_a_damaged_tokenizer_json_is_refused(tmp_path, case):
    edit, message = TOKENIZER_JSON_CASES[case]
    d = llama_dir(tmp_path)
    _edit_tokenizer(d, edit)
    one_line_error(run_script('sample.py', f'--init_from={d}', '--max_new_tokens=1', '--seeds=[1]'), message)
