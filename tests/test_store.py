"""store.py, a memory's directory: save/load round trips, float16 stores (half the size, values
rounded once) and memory-mapped values giving what the memory gives in RAM, saves killed at
any step or run at once, umask and other files kept, refusals of memories of another model
(any one weight) or damaged ones, in our layout and the reference's."""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import shutil
import subprocess
import textwrap

import pytest

from build import build_from_text
from configurator import UserError
from conftest import REF, TEXT, TINY, make_random_checkpoint, run_script
from decoding import generate
from memory import RetrievalSettings
from model import GPT
from run import Sampling, continuations, prompt_ids
from store import load_memory, save_memory
from tokenizer import encode

TYPE3 = RetrievalSettings([0, 3, 3, 0], 5.0, 0.1, 0.01, False, 0.33)


def build(tmp_path, name, *extra):
    text = os.path.join(ROOT, 'data', 'vancouver.txt')
    r = run_script('build_memory.py', text, f'--init_from={TINY}', f'--mem_store={tmp_path / name}', '--layers=[1,2]',
                   *extra)
    assert r.returncode == 0, r.stderr
    return str(tmp_path / name), r.stdout


def three_continuations(model, enc, memory):
    _, ids = prompt_ids("\nThe name of the city is", enc)
    return continuations(model, ids, [1, 2, 3], Sampling(12, 0.8, 200, 'exact'), memory.retrieving_layers(TYPE3))


def test_float16_round_trip(tmp_path):
    model, enc = GPT.from_pretrained(TINY)
    full, _ = build(tmp_path, 'f32')
    half, out = build(tmp_path, 'f16', '--store_dtype=float16')
    assert 'in float16' in out and json.loads(open(os.path.join(half, 'memory.json')).read())['dtype'] == 'float16'
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith('.safetensors'))
    assert size(half) < 0.55 * size(full)
    m32, m16 = load_memory(full, model, enc), load_memory(half, model, enc)
    for layer in (1, 2):
        assert m16.values[layer].dtype == torch.float16
        assert torch.equal(m16.keys[layer], m32.keys[layer].half())  # rounded once, to the nearest float16
        assert torch.equal(m16.values[layer], m32.values[layer].half())
    assert m16.identity() != m32.identity()
    # saving again keeps float16, and the memory still retrieves and generates
    save_memory(m16, str(tmp_path / 'again'))
    assert load_memory(str(tmp_path / 'again'), model, enc).identity() == m16.identity()
    # and the rounding changes nothing that decoding sees here: the float32 memory's continuations
    assert three_continuations(model, enc, m16) == three_continuations(model, enc, m32)


def file_mapping_holds(path, address):
    """True when address lies in a region of this process mapped from the file at path."""
    real = os.path.realpath(path)
    with open('/proc/self/maps') as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                lo, hi = (int(x, 16) for x in fields[0].split('-'))
                if lo <= address < hi:
                    return True
    return False


def test_memory_mapped_values_give_the_same_continuations(tmp_path):
    model, enc = GPT.from_pretrained(TINY)
    for dtype in ('float32', 'float16'):
        path, _ = build(tmp_path, dtype, f'--store_dtype={dtype}')
        in_ram, mapped = load_memory(path, model, enc), load_memory(path, model, enc, mmap=True)
        tensor_file = next(f for f in os.listdir(path) if f.endswith('.safetensors'))
        for layer in (1, 2):
            # the values' memory is a mapping of the tensor file (Linux: /proc/self/maps), not a copy
            assert file_mapping_holds(os.path.join(path, tensor_file), mapped.values[layer].data_ptr())
            assert torch.equal(mapped.values[layer], in_ram.values[layer])
        assert mapped.identity() == in_ram.identity()
        assert three_continuations(model, enc, mapped) == three_continuations(model, enc, in_ram)
    r = run_script('sample.py', f'--init_from={TINY}', '--load_mem_store=True', f'--mem_store={path}', '--mmap=True',
                   '--knn_num=[0,3,3,0]', '--seeds=[1]', '--max_new_tokens=3')
    assert r.returncode == 0, r.stderr


def test_save_load_round_trip(tiny, tmp_path, reference):
    model, enc = tiny
    memory = build_from_text(model, enc, TEXT, layers=[1, 2])
    path = save_memory(memory, tmp_path / 'mem')
    manifest = json.load(open(os.path.join(path, 'memory.json')))
    assert manifest['format_version'] == 2 and manifest['layers'] == [1, 2]
    assert manifest['model']['fingerprint'] == model.fingerprint()
    assert manifest['token_windows'] == [encode(enc, TEXT)] and manifest['text'] == TEXT
    loaded = load_memory(path, model, enc)
    for l in (1, 2):
        assert torch.equal(loaded.keys[l], memory.keys[l]) and torch.equal(loaded.values[l], memory.values[l])
    x = torch.tensor([reference['prompt_ids']])
    outs = []
    for m in (memory, loaded):
        model.attach_memory(m.retrieving_layers(RetrievalSettings([0, 3, 3, 0], mem_frac=5.0, bookkeeping_frac=0.1,
                                                                  knn_softmax_influence=0.01, resid_frac=0.33)))
        torch.manual_seed(1)
        outs.append(generate(model, x, 10, 0.8, 200).tolist())
        model.attach_memory(None)
    assert outs[0] == outs[1]
    assert os.listdir(tmp_path) == ['mem']  # nothing left beside it


def test_interrupted_save_keeps_the_old_memory(tiny, tmp_path, monkeypatch):
    model, enc = tiny
    old = build_from_text(model, enc, TEXT, layers=[1])
    path = save_memory(old, tmp_path / 'mem')
    new = build_from_text(model, enc, TEXT + " More.", layers=[2])
    import safetensors.torch

    def crash(tensors, filename, *a, **k):
        with open(filename, 'wb') as f:
            f.write(b'half a file')
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, 'save_file', crash)
    with pytest.raises(KeyboardInterrupt):
        save_memory(new, path)
    assert os.listdir(tmp_path) == ['mem']
    assert load_memory(path, model, enc).stored_layers == [1]


def test_refuses_memory_of_another_model(tiny, tmp_path):
    model, enc = tiny
    make_random_checkpoint(tmp_path / 'other', seed=5, n_embd=64, n_layer=4, n_head=4, n_positions=256)
    other, _ = GPT.from_pretrained(str(tmp_path / 'other'))
    path = save_memory(build_from_text(other, enc, TEXT, layers=[1]), tmp_path / 'mem')
    with pytest.raises(UserError, match=r'memory was made by model other \(weights [0-9a-f]+\), not by tiny-gpt2'):
        load_memory(path, model, enc)
    make_random_checkpoint(tmp_path / 'small', seed=5)
    small, _ = GPT.from_pretrained(str(tmp_path / 'small'))
    path = save_memory(build_from_text(small, enc, TEXT, layers=[1]), tmp_path / 'mem2')
    with pytest.raises(UserError, match=r'n_layer=3 \(small\), this model has n_layer=4 \(tiny-gpt2\)'):
        load_memory(path, model, enc)


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'manifest', 'missing'])
def test_refuses_corrupted_memory(tiny, tmp_path, damage):
    model, enc = tiny
    path = save_memory(build_from_text(model, enc, TEXT, layers=[1]), tmp_path / 'mem')
    tensors = os.path.join(path, *json.load(open(os.path.join(path, 'memory.json')))['tensors'])
    if damage == 'truncate':
        data = open(tensors, 'rb').read()
        open(tensors, 'wb').write(data[:len(data) // 2])
    elif damage == 'flip':
        data = bytearray(open(tensors, 'rb').read())
        data[-5] ^= 0xFF
        open(tensors, 'wb').write(bytes(data))
    elif damage == 'manifest':
        open(os.path.join(path, 'memory.json'), 'w').write('{"format": "gpt2-persistent-mem')
    else:
        os.remove(tensors)
    with pytest.raises(UserError, match='rebuild'):
        load_memory(path, model, enc)


def test_refuses_legacy_memory_of_another_shape(tmp_path):
    make_random_checkpoint(tmp_path / 'm', seed=1, n_embd=32, n_head=4, n_layer=4)
    model, enc = GPT.from_pretrained(str(tmp_path / 'm'))
    with pytest.raises(UserError, match=r'expected \(N\+1, 8\)'):
        load_memory(os.path.join(REF, 'legacy-memstores', 'type2_recall_one_layer', 'memstore'), model, enc)


def test_a_memory_is_refused_by_a_model_differing_in_any_one_weight(tmp_path):
    make_random_checkpoint(tmp_path / 'ckpt', seed=4, n_embd=64, n_positions=128)
    model, enc = GPT.from_pretrained(str(tmp_path / 'ckpt'))
    path = save_memory(build_from_text(model, enc, TEXT, layers=[1]), tmp_path / 'mem')
    g = torch.Generator().manual_seed(0)
    for name in ('transformer.h.2.mlp.c_fc.weight', 'transformer.wpe.weight', 'transformer.h.0.ln_1.bias'):
        other, _ = GPT.from_pretrained(str(tmp_path / 'ckpt'))
        p = dict(other.named_parameters())[name]
        step = max(1, p.numel() // 4096)  # the old fingerprint read every step-th value
        i = int(torch.randint(0, p.numel(), (1,), generator=g))
        i += 1 if step > 1 and i % step == 0 else 0  # for big tensors, a position the old one skipped
        with torch.no_grad():
            p.view(-1)[i] += 1e-3
        assert other.fingerprint() != model.fingerprint(), name
        if step > 1:  # what the old fingerprint missed
            assert other.fingerprint_sampled() == model.fingerprint_sampled(), name
        with pytest.raises(UserError, match='memory was made by model ckpt'):
            load_memory(path, other, enc)
    assert load_memory(path, model, enc).num_entries() > 0


def test_fingerprint_follows_in_place_changes_and_format_1_memories_still_load(tiny, tmp_path):
    model, enc = tiny
    before = model.fingerprint()
    w = model.transformer.h[0].attn.c_proj.weight
    original = w[3, 5].item()
    with torch.no_grad():
        w[3, 5] += 1.0
    try:
        assert model.fingerprint() != before  # the cached fingerprint is not stale
    finally:
        with torch.no_grad():
            w[3, 5] = original
    assert model.fingerprint() == before
    # a memory saved by the previous format: sampled fingerprint, memory.safetensors, no scheme
    path = save_memory(build_from_text(model, enc, TEXT, layers=[1]), tmp_path / 'mem')
    manifest = json.loads((tmp_path / 'mem' / 'memory.json').read_text())
    (name, checksum), = manifest['tensors'].items()
    os.rename(os.path.join(path, name), os.path.join(path, 'memory.safetensors'))
    manifest.update(format_version=1, tensors={'memory.safetensors': checksum})
    manifest['model'].pop('fingerprint_scheme')
    manifest['model']['fingerprint'] = model.fingerprint_sampled()
    (tmp_path / 'mem' / 'memory.json').write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match='checked against one weight in ~4096 only'):
        assert load_memory(path, model, enc).num_entries() == len(enc.encode(TEXT)) - 1


def test_a_save_killed_at_any_step_of_an_overwrite_leaves_a_loadable_memory(tiny, tmp_path, monkeypatch):
    model, enc = tiny
    old = build_from_text(model, enc, TEXT, layers=[1])
    new = build_from_text(model, enc, TEXT + " More.", layers=[1, 2])
    import safetensors.torch
    steps = []
    primitives = {'safetensors.torch.save_file': (safetensors.torch, 'save_file'), 'os.replace': (os, 'replace'),
                  'os.remove': (os, 'remove'), 'os.fsync': (os, 'fsync'), 'os.chmod': (os, 'chmod')}

    def instrument(kill_at):
        for label, (mod, attr) in primitives.items():
            real = getattr(mod, attr)

            def step(*a, _real=real, _label=label, **k):
                steps.append(_label)
                if len(steps) == kill_at:
                    raise KeyboardInterrupt(f"killed at {_label}")
                return _real(*a, **k)
            monkeypatch.setattr(mod, attr, step)

    path = str(tmp_path / 'mem')
    save_memory(old, path)
    instrument(kill_at=None)
    save_memory(new, path)
    n_steps = len(steps)
    monkeypatch.undo()
    assert n_steps >= 5
    for kill_at in range(1, n_steps + 1):
        shutil.rmtree(path)
        save_memory(old, path)
        steps.clear()
        instrument(kill_at)
        with pytest.raises(KeyboardInterrupt):
            save_memory(new, path)
        monkeypatch.undo()
        loaded = load_memory(path, model, enc)  # the old memory or the new one, never neither
        assert loaded.stored_layers in ([1], [1, 2]), kill_at
        for l in loaded.stored_layers:
            source = old if loaded.stored_layers == [1] else new
            assert torch.equal(loaded.keys[l], source.keys[l])
        save_memory(new, path)  # the next save cleans up what the killed one left
        assert sorted(f for f in os.listdir(path) if not f.endswith('.lock')) == \
            sorted(['memory.json', *json.loads(open(os.path.join(path, 'memory.json')).read())['tensors']])


def test_concurrent_saves_to_one_path_are_serialised(tmp_path):
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from build import build_from_text
        from model import GPT
        from store import save_memory
        model, enc = GPT.from_pretrained({TINY!r})
        memory = build_from_text(model, enc, {TEXT!r} * int(sys.argv[1]), layers=[1])
        for _ in range(6):
            save_memory(memory, {str(tmp_path / 'mem')!r})
    """)
    procs = [subprocess.Popen([sys.executable, '-c', script, str(n)], stderr=subprocess.PIPE, text=True)
             for n in (1, 2, 3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    model, enc = GPT.from_pretrained(TINY)
    n = load_memory(str(tmp_path / 'mem'), model, enc).num_entries()
    assert n in {len(enc.encode(TEXT * k)) - 1 for k in (1, 2, 3)}
    assert sorted(os.listdir(tmp_path / 'mem'))[0] == 'memory-' + json.loads(
        (tmp_path / 'mem' / 'memory.json').read_text())['tensors'].popitem()[1][:16] + '.safetensors'
    assert len(os.listdir(tmp_path / 'mem')) == 3  # tensors, manifest, lock: nothing left behind


def test_overwriting_a_memory_keeps_other_files_and_follows_the_umask(tiny, tmp_path):
    model, enc = tiny
    path = save_memory(build_from_text(model, enc, TEXT, layers=[1]), tmp_path / 'mem')
    (tmp_path / 'mem' / 'notes.txt').write_text('mine')
    old = os.umask(0o022)
    try:
        save_memory(build_from_text(model, enc, TEXT, layers=[2]), path)
    finally:
        os.umask(old)
    assert (tmp_path / 'mem' / 'notes.txt').read_text() == 'mine'
    for f in os.listdir(path):
        if not f.endswith(('.txt', '.lock')):
            assert os.stat(os.path.join(path, f)).st_mode & 0o777 == 0o644, f
    assert os.stat(path).st_mode & 0o777 == 0o755


@pytest.mark.parametrize('damage,fragment', [
    ('manifest_list', 'holds a list, not an object'),
    ('manifest_layers', "its 'layers' is not a list of layer indices"),
    ('manifest_tensors', "its 'tensors' does not name one tensor file"),
    ('manifest_traversal', "its 'tensors' does not name one tensor file"),
    ('rank', 'must be (heads, N, head_size) alike'),
    ('nan', 'holds NaN or infinite values'),
])
def test_damaged_memories_are_refused(tiny, tmp_path, damage, fragment):
    from safetensors.torch import save_file

    from files import sha256_file
    model, enc = tiny
    path = save_memory(build_from_text(model, enc, TEXT, layers=[1]), tmp_path / 'mem')
    mf = tmp_path / 'mem' / 'memory.json'
    manifest = json.loads(mf.read_text())
    if damage == 'manifest_list':
        mf.write_text('[]')
    elif damage == 'manifest_layers':
        mf.write_text(json.dumps(dict(manifest, layers='1')))
    elif damage == 'manifest_tensors':
        mf.write_text(json.dumps(dict(manifest, tensors=['memory.safetensors'])))
    elif damage == 'manifest_traversal':
        mf.write_text(json.dumps(dict(manifest, tensors={'../../etc/passwd': 'x'})))
    else:
        (name, _), = manifest['tensors'].items()
        keys = memory_keys = load_memory(path, model, enc).keys[1]
        if damage == 'rank':
            keys, values = memory_keys[0], memory_keys[0].clone()
        else:
            keys, values = memory_keys.clone(), memory_keys.clone()
            keys[0, 2, 1] = float('nan')
        save_file({'layer1.keys': keys.contiguous(), 'layer1.values': values.contiguous()}, str(tmp_path / 'mem' / name))
        mf.write_text(json.dumps(dict(manifest, tensors={name: sha256_file(tmp_path / 'mem' / name)})))
    with pytest.raises(UserError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
        load_memory(path, model, enc)


def test_legacy_memories_of_another_model_or_damaged_are_refused(tiny, tmp_path):
    model, enc = tiny
    src = os.path.join(REF, 'legacy-memstores', 'type2_recall_one_layer', 'memstore')
    extra = tmp_path / 'extra'
    shutil.copytree(src, extra)
    for store in ('keyStore', 'valueStore'):  # a fifth head: made by a model with more heads
        shutil.copy(extra / store / '2' / '0.pt', extra / store / '2' / '4.pt')
    with pytest.raises(UserError, match=r'holds 5 head files, this model has 4 heads'):
        load_memory(str(extra), model, enc)
    rows = tmp_path / 'rows'
    shutil.copytree(src, rows)
    t = torch.load(rows / 'valueStore' / '2' / '1.pt', weights_only=True)
    torch.save(t[:-3].clone(), rows / 'valueStore' / '2' / '1.pt')
    with pytest.raises(UserError, match=r'layer 2 head 1: \d+ stored keys but \d+ values'):
        load_memory(str(rows), model, enc)
