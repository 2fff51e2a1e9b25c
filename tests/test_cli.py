"""The scripts as a user runs them (in this process, through their main): main jobs, and
one-line errors for bad values, damaged files, a full disk and a read-only folder."""
import json
import os
import subprocess

import pytest

from configurator import UserError
from conftest import REF, TINY, TINY_ARG, make_random_checkpoint, one_line_error, run_script
from model import GPT
from store import load_memory


def assert_one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(('building', 'generating'))]
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    assert 'Traceback' not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_build_memory_then_sample_from_it(tmp_path, reference):
    text = tmp_path / 'cats.txt'
    text.write_text(reference['memory_text'][1:] + '\n', encoding='utf-8')  # the file form: no bookkeeping token
    store = tmp_path / 'mem'
    r = run_script('build_memory.py', str(text), TINY_ARG, f'--mem_store={store}', '--layers=[1,2]')
    assert r.returncode == 0, r.stderr
    assert f'stored {len(reference["memory_ids"]) - 1} tokens per head' in r.stdout
    assert 'layers [1, 2]' in r.stdout and str(store) in r.stdout and 'MB on disk' in r.stdout
    out = tmp_path / 'samples.jsonl'
    case = next(c for c in reference['cases'] if c['name'] == 'type3_sentiment_two_layers')
    r = run_script('sample.py', TINY_ARG, '--load_mem_store=True', f'--mem_store={store}',
                   f'--knn_num={case["knn_num"]}', f'--mem_frac={case["mem_frac"]}',
                   f'--bookkeeping_frac={case["bookkeeping_frac"]}',
                   f'--knn_softmax_influence={case["knn_softmax_influence"]}', f'--resid_frac={case["resid_frac"]}',
                   f'--start={reference["prompt"]}', f'--seeds={reference["seeds"]}', '--max_new_tokens=24',
                   '--unadulterated_gpt=True', f'--out_jsonl={out}')
    assert r.returncode == 0, r.stderr
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(records) == 6
    model = GPT.from_pretrained(TINY)[0]
    stored = load_memory(str(store), model)
    for rec in records:
        expected = reference['unadulterated'] if rec['kind'] == 'plain' else case['continuations']
        assert rec['tokens'] == expected[str(rec['seed'])]
        assert rec['prompt'] == reference['prompt'] and isinstance(rec['text'], str)
        # every record says what produced it: the weights, the sampling and, for the method, the memory
        assert rec['model']['fingerprint'] == model.fingerprint() and rec['model']['arch'] == 'gpt2'
        assert rec['sampling'] == dict(max_new_tokens=24, temperature=0.8, top_k=200, decoding='exact')
        if rec['kind'] == 'plain':
            assert rec['label'] == 'Unadulterated GPT-2 Generated Text' and rec['method'] is None
        else:
            assert rec['label'] == 'No Memory'  # the reference's default method_text
            assert rec['method']['memory']['identity'] == stored.identity()
            assert rec['method']['memory']['store'] == str(store) and rec['method']['memory']['layers'] == [1, 2]
            assert rec['method']['retrieval']['knn_num'] == case['knn_num']
            assert rec['method']['retrieval']['resid_frac'] == case['resid_frac']
            assert rec['method']['search'] == 'faiss'
    assert r.stdout.index('Unadulterated GPT-2 Generated Text') < r.stdout.index('No Memory')


def test_sample_with_reference_layout_memory(reference):
    case = next(c for c in reference['cases'] if c['name'] == 'type2_recall_one_layer')
    store = os.path.join(REF, 'legacy-memstores', 'type2_recall_one_layer', 'memstore')
    r = run_script('sample.py', TINY_ARG, '--load_mem_store=True', f'--mem_store={store}', '--knn_num=[0,0,5,0]',
                   '--bookkeeping_frac=0.03', '--knn_softmax_influence=1000', '--resid_only=True', '--resid_frac=0.1',
                   f'--start={reference["prompt"]}', '--seeds=[2658]', '--max_new_tokens=24', '--out_jsonl=/dev/stdout')
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec['tokens'] == case['continuations']['2658']


def test_memory_text_built_on_the_fly_matches_reference(reference, tmp_path):
    """The `memory` key is tokenized as given, its bookkeeping token included (as the reference's configs)."""
    case = next(c for c in reference['cases'] if c['name'] == 'type1_all_layers')
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(f"""
init_from = {TINY!r}
bookkeeping_token = "\\n"
substitute = "curious"   # a helper variable, as in the reference's configs
memory = f"{{bookkeeping_token}}Cats are {{substitute}} animals that sleep for most of the day and play at night. Dogs and cats can live together when they are introduced slowly and kindly."
knn_num = [2, 2, 2, 2]
mem_frac = 1.0
start = {reference['prompt']!r}
seeds = [8932]
max_new_tokens = 24
out_jsonl = {str(tmp_path / 'records.jsonl')!r}
""")
    r = run_script('sample.py', str(cfg))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / 'records.jsonl').read_text())['tokens'] == case['continuations']['8932']


def test_long_prompt_is_cropped_with_a_warning():
    r = run_script('sample.py', TINY_ARG, '--start=' + 'cats ' * 300, '--seeds=[1]', '--max_new_tokens=3')
    assert r.returncode == 0, r.stderr
    assert 'warning: prompt of 302 tokens is longer than block_size 256' in r.stderr


@pytest.mark.parametrize('args,fragments', [
    (['--knn_num=[0,5,0]', '--memory=\nCats'], ['knn_num has 3 entries, the model has 4 layers']),
    (['--knn_num=[0,-1,0,0]', '--memory=\nCats'], ['knn_num[1]=-1']),
    (['--knn_num=[0,1,0,0]', '--memory=\nCats', '--mem_frac=-1'], ['mem_frac=-1.0 must be a number from 0 to']),
    (['--knn_num=[0,1,0,0]', '--memory=\nCats', '--bookkeeping_frac=-0.1'], ['bookkeeping_frac=-0.1']),
    (['--knn_num=[0,1,0,0]', '--memory=\nCats', '--knn_softmax_influence=-2'], ['knn_softmax_influence=-2.0']),
    (['--knn_num=[0,1,0,0]', '--memory=\nCats', '--resid_frac=1.5'], ['resid_frac=1.5 must be between 0 and 1']),
    (['--knn_nums=[0,1,0,0]'], ['unknown config key knn_nums', 'did you mean knn_num?']),
    (['--temperature=hot'], ['temperature=\'hot\' should be a float']),
    (['--knn_num=[0,1,0,0]'], ['memory text is empty']),
    (['--knn_num=[0,1,0,0]', '--memory=FILE:/nonexistent/mem.txt'], ['memory file /nonexistent/mem.txt does not exist']),
    (['--load_mem_store=True', '--mem_store=/nonexistent/mem', '--knn_num=[0,1,0,0]'], ['does not exist; build one']),
    (['config/nonexistent.py'], ['config file config/nonexistent.py does not exist']),
    (['--device=cuda:0'], ['CUDA is not available']),
])
def test_bad_input_is_one_clear_line(args, fragments):
    if '--device=cuda:0' in args:
        import torch
        if torch.cuda.is_available():
            pytest.skip('CUDA is available here')
    assert_one_line_error(run_script('sample.py', TINY_ARG, *args), *fragments)


@pytest.mark.parametrize('content,fragment', [
    (b'', 'is empty'), (b'  \n\n', 'is empty'), (b'caf\xe9 latin-1', 'is not UTF-8 text'),
])
def test_bad_memory_files(tmp_path, content, fragment):
    f = tmp_path / 'mem.txt'
    f.write_bytes(content)
    assert_one_line_error(run_script('build_memory.py', str(f), TINY_ARG, f'--mem_store={tmp_path / "m"}'), fragment)
    assert not (tmp_path / 'm').exists()
    assert_one_line_error(run_script('sample.py', TINY_ARG, '--knn_num=[0,1,0,0]', f'--memory=FILE:{f}'), fragment)


def test_build_memory_bad_arguments(tmp_path):
    assert_one_line_error(run_script('build_memory.py', TINY_ARG), 'give one text file')
    assert_one_line_error(run_script('build_memory.py', '/nonexistent.txt', TINY_ARG), 'does not exist')
    f = tmp_path / 't.txt'
    f.write_text('Cats are nice.')
    assert_one_line_error(run_script('build_memory.py', str(f), TINY_ARG, '--layers=[7]'), 'not layers of this 4-layer model')
    (tmp_path / 'notmem').mkdir()
    (tmp_path / 'notmem' / 'precious.txt').write_text('keep me')
    assert_one_line_error(run_script('build_memory.py', str(f), TINY_ARG, f'--mem_store={tmp_path / "notmem"}'),
                          'is not a memory directory')
    assert (tmp_path / 'notmem' / 'precious.txt').read_text() == 'keep me'


def test_sample_refuses_memory_of_another_model_and_corrupted_memory(tmp_path):
    make_random_checkpoint(tmp_path / 'other', seed=9, n_embd=64, n_layer=4, n_head=4, n_positions=256)
    f = tmp_path / 't.txt'
    f.write_text('Cats are nice.')
    assert run_script('build_memory.py', str(f), f'--init_from={tmp_path / "other"}', f'--mem_store={tmp_path / "m"}').returncode == 0
    args = ['--load_mem_store=True', f'--mem_store={tmp_path / "m"}', '--knn_num=[0,1,0,0]']
    assert_one_line_error(run_script('sample.py', TINY_ARG, *args), 'memory was made by model other', 'not by tiny-gpt2')
    tensors = next((tmp_path / 'm').glob('memory-*.safetensors'))
    tensors.write_bytes(tensors.read_bytes()[:100])
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path / "other"}', *args), 'truncated or altered')


def test_config_file_typo_is_caught(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('mem_fraq = 5\n')
    assert_one_line_error(run_script('sample.py', str(cfg)), 'unknown config key mem_fraq', 'did you mean mem_frac?')


def test_store_mem_saves_what_was_built_and_loads_back(tmp_path, reference):
    store = tmp_path / 'built'
    common = [TINY_ARG, '--knn_num=[0,3,3,0]', '--mem_frac=5.0', '--bookkeeping_frac=0.1',
              '--knn_softmax_influence=0.01', '--resid_frac=0.33', f'--start={reference["prompt"]}',
              '--seeds=[1337,2658]', '--max_new_tokens=24', '--out_jsonl=/dev/stdout']
    first = run_script('sample.py', *common, f'--memory={reference["memory_text"]}', '--store_mem=True',
                       f'--mem_store={store}')
    assert first.returncode == 0, first.stderr
    assert (store / 'memory.json').is_file()
    again = run_script('sample.py', *common, '--load_mem_store=True', f'--mem_store={store}')
    assert again.returncode == 0, again.stderr
    tokens = lambda r: [json.loads(l)['tokens'] for l in r.stdout.splitlines() if l.startswith('{')]
    case = next(c for c in reference['cases'] if c['name'] == 'type3_sentiment_two_layers')
    assert tokens(first) == tokens(again) == [case['continuations']['1337'], case['continuations']['2658']]


def test_cached_decoding_from_the_command_line(reference):
    r = run_script('sample.py', TINY_ARG, '--knn_num=[0,3,3,0]', f'--memory={reference["memory_text"]}',
                   '--mem_frac=5.0', '--decoding=cached', f'--start={reference["prompt"]}', '--seeds=[1337]',
                   '--max_new_tokens=5', '--out_jsonl=/dev/stdout')
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])['tokens']) == 5
    assert_one_line_error(run_script('sample.py', TINY_ARG, '--decoding=fast'), "decoding='fast' must be 'exact' or 'cached'")


# --- failures: bad values, damaged files, a full disk, a read-only folder



# --- fingerprints -------------------------------------------------------------


# --- saves ------------------------------------------------------------------------


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
    ('temperature = float("nan")', 'temperature a finite number >= 1e-4'),
    ('temperature = float("inf")', 'temperature a finite number >= 1e-4'),
    ('knn_softmax_influence = float("nan")', 'knn_softmax_influence=nan must be a number from 0 to'),
    ('mem_frac = float("inf")', 'mem_frac=inf must be a number from 0 to'),
    ('bookkeeping_frac = float("nan")', 'bookkeeping_frac=nan must be a number from 0 to'),
    ('resid_frac = float("nan")', 'resid_frac=nan must be between 0 and 1'),
    ('top_k = None\nseed = 2 ** 64', 'from 0 to 2**63 - 1'),
    ('memory = None', 'memory=None is not allowed'),
])
def test_bad_values_in_config_files_are_one_line_errors(tmp_path, line, fragment):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(f"knn_num = [0, 1, 0, 0]\nmemory = '\\nCats'\nmax_new_tokens = 2\n{line}\n")
    one_line_error(run_script('sample.py', TINY_ARG, str(cfg)), fragment)


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
