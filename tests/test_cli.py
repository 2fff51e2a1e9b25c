"""The scripts as a user runs them: main jobs, and one-line errors for bad input."""
import json
import os

import pytest

from conftest import REF, TINY, run_script

TINY_ARG = f'--init_from={TINY}'


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
    from model import GPT
    from store import load_memory
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
out_jsonl = "/dev/stdout"
""")
    r = run_script('sample.py', str(cfg))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])['tokens'] == case['continuations']['8932']


def test_long_prompt_is_cropped_with_a_warning():
    r = run_script('sample.py', TINY_ARG, '--start=' + 'cats ' * 300, '--seeds=[1]', '--max_new_tokens=3')
    assert r.returncode == 0, r.stderr
    assert 'warning: prompt of 302 tokens is longer than block_size 256' in r.stderr


@pytest.mark.parametrize('args,fragments', [
    (['--knn_num=[0,5,0]', '--memory=\nCats'], ['knn_num has 3 entries, the model has 4 layers']),
    (['--knn_num=[0,-1,0,0]', '--memory=\nCats'], ['knn_num[1]=-1']),
    (['--knn_num=[0,1,0,0]', '--memory=\nCats', '--mem_frac=-1'], ['mem_frac=-1.0 must be a number >= 0']),
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
    from conftest import make_random_checkpoint
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
