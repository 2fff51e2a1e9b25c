"""Reliability: fingerprints over every weight, saves that stay whole when killed or run
concurrently, appends that land whole, and bad values, damaged files and environment faults
as one-line errors with nothing half-written."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from build import build_from_text
from configurator import UserError
from conftest import REF, ROOT, TINY, make_random_checkpoint, run_script
from model import GPT
from store import load_memory, save_memory

TEXT = "\nCats are curious animals that sleep for most of the day and play at night."
TINY_ARG = f'--init_from={TINY}'


def one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(('building', 'generating',
                                                                                  'settings', 'sweep '))]
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# --- fingerprints -------------------------------------------------------------

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


# --- saves ------------------------------------------------------------------------

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


# --- appends ----------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, where this machine lets the test mount one (root)."""
    d = tmp_path / 'disk'
    d.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'mount failed'}); "
                    f"the full-disk append is not tested")
    yield d
    subprocess.run(['umount', str(d)], check=True)


def test_an_append_on_a_full_disk_lands_whole_or_not_at_all(small_disk):
    from run import append_jsonl
    out = small_disk / 'samples.jsonl'
    record = dict(seed=1, text='x' * 3000)
    written = 0
    with pytest.raises(UserError, match=r'cannot write .*samples.jsonl: No space left on device \(the disk is full\)'):
        for _ in range(100):
            append_jsonl(str(out), [record, record])
            written += 2
    lines = out.read_text().splitlines()
    assert written > 0 and len(lines) == written and all(json.loads(l) == record for l in lines)


def test_sample_on_a_full_disk_is_one_line_and_keeps_earlier_records(small_disk, reference):
    out = small_disk / 'samples.jsonl'
    out.write_text('{"kept": true}\n' + 'x' * 60000 + '\n')
    r = run_script('sample.py', TINY_ARG, '--seeds=40', '--max_new_tokens=40', f'--out_jsonl={out}')
    one_line_error(r, f'cannot write {out}', 'disk is full')
    assert out.read_text().splitlines()[0] == '{"kept": true}' and len(out.read_text().splitlines()) == 2


# --- damaged inputs -----------------------------------------------------------------

def test_damaged_checkpoints_are_one_line_errors(tmp_path):
    for damage, fragment in (('truncate', 'is truncated or damaged'), ('json', 'is not valid JSON'),
                             ('field', 'lacks or has bad values for n_head'), ('list', 'holds a list')):
        d = tmp_path / damage
        make_random_checkpoint(d, seed=1)
        if damage == 'truncate':
            data = (d / 'model.safetensors').read_bytes()
            (d / 'model.safetensors').write_bytes(data[:len(data) // 3])
        else:
            cfg = json.loads((d / 'config.json').read_text())
            cfg.pop('n_head')
            (d / 'config.json').write_text({'json': '{"n_layer": 3,', 'field': json.dumps(cfg), 'list': '[1, 2]'}[damage])
        one_line_error(run_script('sample.py', f'--init_from={d}', '--max_new_tokens=2'), fragment)


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


# --- bad values and environment faults through the command line -------------------------

@pytest.mark.parametrize('args,fragments', [
    (['--temperature=None'], ['temperature=None is not allowed']),
    (['--max_new_tokens=None'], ['max_new_tokens=None is not allowed']),
    (['--temperature=nan'], ["temperature='nan' should be a float"]),
    (['--seed=18446744073709551616'], ['from 0 to 2**63 - 1']),
    (['--seeds=[1, 99999999999999999999999]'], ['from 0 to 2**63 - 1']),
    (['--seeds=1000000000000'], ['seeds=1000000000000 must be a count from 1 to 1000000']),
    (['--num_samples=0'], ['num_samples=0 must be a count from 1']),
    (['--knn_num=[0,1.5,0,0]', '--memory=\nCats'], ['knn_num[1]=1.5: each k must be a whole number']),
    (['--knn_num=[0,1,0,0]', '--memory=\nCats', '--remove_bookkeeping_token_mem_size=0.5'],
     ['remove_bookkeeping_token_mem_size=0.5 must be a whole number']),
    (['--max_new_tokens=2.5'], ["max_new_tokens=2.5 should be a int"]),
    (['--device=gpu'], ["device='gpu' is not a device this code runs on"]),
    (['--device=tpu:0'], ["device='tpu:0' is not a device"]),
    (['--search=fiass'], ["search='fiass' must be one of 'faiss', 'torch'"]),
])
def test_bad_values_are_one_line_errors(args, fragments):
    one_line_error(run_script('sample.py', TINY_ARG, '--max_new_tokens=2', *args), *fragments)


@pytest.mark.parametrize('line,fragment', [
    ('temperature = float("nan")', 'temperature a finite number > 0'),
    ('temperature = float("inf")', 'temperature a finite number > 0'),
    ('knn_softmax_influence = float("nan")', 'knn_softmax_influence=nan must be a number >= 0'),
    ('mem_frac = float("inf")', 'mem_frac=inf must be a number >= 0'),
    ('bookkeeping_frac = float("nan")', 'bookkeeping_frac=nan must be a number >= 0'),
    ('resid_frac = float("nan")', 'resid_frac=nan must be between 0 and 1'),
    ('top_k = None\nseed = 2 ** 64', 'from 0 to 2**63 - 1'),
    ('memory = None', 'memory=None is not allowed'),
])
def test_bad_values_in_config_files_are_one_line_errors(tmp_path, line, fragment):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(f"knn_num = [0, 1, 0, 0]\nmemory = '\\nCats'\nmax_new_tokens = 2\n{line}\n")
    one_line_error(run_script('sample.py', TINY_ARG, str(cfg)), fragment)


def test_a_huge_k_is_clipped_to_the_memory_size(reference):
    r = run_script('sample.py', TINY_ARG, '--knn_num=[0,1000000000000,0,0]', f'--memory={reference["memory_text"]}',
                   '--mem_frac=5.0', '--seeds=[1]', '--max_new_tokens=3', '--out_jsonl=/dev/stdout')
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])['tokens']) == 3


def test_environment_faults_are_one_line_errors(tmp_path, reference):
    blocker = tmp_path / 'file.txt'
    blocker.write_text('a regular file')
    mem = ['--knn_num=[0,1,0,0]', f'--memory={reference["memory_text"]}', '--store_mem=True']
    one_line_error(run_script('sample.py', TINY_ARG, *mem, f'--mem_store={blocker}/mem', '--max_new_tokens=2'),
                   f'cannot create folder {blocker}/mem')
    one_line_error(run_script('sample.py', TINY_ARG, '--max_new_tokens=2', f'--out_jsonl={tmp_path}'),
                   f'cannot append to {tmp_path}: it is a folder')
    one_line_error(run_script('sample.py', TINY_ARG, '--max_new_tokens=2', f'--out_jsonl={blocker}/x.jsonl'),
                   f'cannot create folder {blocker}')
    one_line_error(run_script('build_memory.py', str(blocker), TINY_ARG, f'--mem_store={blocker}'),
                   'exists and is not a memory directory')
    assert blocker.read_text() == 'a regular file'


def test_a_read_only_folder_is_a_one_line_error(tmp_path, reference):
    ro = tmp_path / 'ro'
    ro.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        os.chmod(ro, 0o500)
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip(f"cannot make a read-only folder here ({r.stderr.strip()}); not tested")
    try:
        one_line_error(run_script('sample.py', TINY_ARG, '--max_new_tokens=2', f'--out_jsonl={ro}/s.jsonl'),
                       f'cannot write {ro}/s.jsonl', 'Read-only file system' if r.returncode == 0 else 'ermission')
        one_line_error(run_script('sample.py', TINY_ARG, '--knn_num=[0,1,0,0]', f'--memory={reference["memory_text"]}',
                                  '--store_mem=True', f'--mem_store={ro}/mem', '--max_new_tokens=2'), f'{ro}/mem')
    finally:
        if r.returncode == 0:
            subprocess.run(['umount', str(ro)], check=True)


# --- sweeps ---------------------------------------------------------------------------

SWEEP = f"""
init_from = {TINY!r}
memory = {TEXT!r}
start = "\\nCats are horrible"
knn_num = [0, 3, 3, 0]
mem_frac = 5.0
seeds = 2
max_new_tokens = 4
baselines = ['plain']
plots = False
"""


def sweep(*args):
    return run_script('sweep.py', *args, env=dict(OMP_NUM_THREADS='1'))


def test_a_bad_grid_setting_stops_the_sweep_before_anything_runs(tmp_path):
    cfg = tmp_path / 'sweep_bad.py'
    cfg.write_text(SWEEP + "grid = {'knn_num': [[0, 3, 3, 0], [0, 3, 3]]}\n")
    one_line_error(sweep(str(cfg), f'--out_dir={tmp_path / "out"}'), 'knn_num has 3 entries, the model has 4 layers')
    assert not (tmp_path / 'out' / 'settings').exists()
    cfg.write_text(SWEEP + "grid = {'mem_frac': [1.0, float('nan')]}\n")
    one_line_error(sweep(str(cfg), f'--out_dir={tmp_path / "out"}'), 'mem_frac=nan must be a number >= 0')
    assert not (tmp_path / 'out' / 'settings').exists()


def test_a_settings_file_that_lost_rows_is_rerun_and_a_merge_with_missing_shards_fails(tmp_path):
    cfg = tmp_path / 'sweep_rows.py'
    cfg.write_text(SWEEP + "grid = {'mem_frac': [1.0, 5.0]}\n")
    out = tmp_path / 'out'
    assert sweep(str(cfg), f'--out_dir={out}').returncode == 0
    files = sorted((out / 'settings').glob('*.json'))
    rec = json.loads(files[0].read_text())
    rec['rows'] = rec['rows'][:1]
    files[0].write_text(json.dumps(rec))
    r = sweep(str(cfg), f'--out_dir={out}')
    assert r.returncode == 0 and 'does not hold one complete row per seed' in r.stderr
    assert '2 already finished, 1 to run' in r.stderr
    assert len(json.loads(files[0].read_text())['rows']) == 2
    sharded = tmp_path / 'sharded'
    assert sweep(str(cfg), f'--out_dir={sharded}', '--shard=0/3').returncode == 0
    r = sweep(str(cfg), f'--out_dir={sharded}', '--merge=True')
    one_line_error(r, 'missing 2 of 3 settings (shards i/3: 1/3, 2/3)', 'run them, then merge again')
