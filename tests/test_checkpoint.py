"""checkpoint.py: hub ids from the cache offline, partial caches, no network, damaged checkpoint directories."""
import json
import os
import shutil

import pytest

from checkpoint import gpt2_checkpoint
from configurator import UserError
from conftest import TINY, make_random_checkpoint, one_line_error, run_script
from model import GPT


def hub_cache(root, repo_id, files=None, revision='a' * 40):
    """A Hugging Face cache (hub layout) holding the fixture's files (or some of them) for repo_id."""
    repo = root / ('models--' + repo_id.replace('/', '--'))
    snap = repo / 'snapshots' / revision
    snap.mkdir(parents=True)
    for f in files or os.listdir(TINY):
        shutil.copy(os.path.join(TINY, f), snap / f)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    return root


SAMPLE_ARGS = ('--start=\nCats are horrible', '--seeds=[1337]', '--max_new_tokens=24')


@pytest.mark.parametrize('cached_as,init_from', [('gpt2', 'gpt2'),  # a cache from before the hub's rename
                                                 ('openai-community/gpt2', 'gpt2'),
                                                 ('openai-community/gpt2', 'openai-community/gpt2'),
                                                 ('openai-community/gpt2', 'openai-community/gpt2@' + 'a' * 40),
                                                 ('someone/tiny-gpt2', 'someone/tiny-gpt2')])
def test_hub_ids_load_from_the_cache_offline(tmp_path, cached_as, init_from):
    """A GPT-2 short name, an organisation's id and an id with a revision go through
    huggingface_hub's cache (hub layout), with HF_HUB_OFFLINE=1."""
    env = dict(HF_HUB_CACHE=str(hub_cache(tmp_path / 'hub', cached_as)), HF_HUB_OFFLINE='1')
    r = run_script('sample.py', f'--init_from={init_from}', *SAMPLE_ARGS, env=env)
    assert r.returncode == 0, r.stderr
    # the same continuation as the fixture's plain model (reference_outputs.json)
    ref = json.load(open(os.path.join(TINY, '..', 'reference_outputs.json')))
    model, enc = GPT.from_pretrained(TINY)
    assert ('\nCats are horrible' + enc.decode(ref['unadulterated']['1337'])) in r.stdout


def test_a_partial_cache_names_the_missing_files(tmp_path):
    """A nanoGPT user's cache: the weights and config, not the tokenizer files."""
    env = dict(HF_HUB_CACHE=str(hub_cache(tmp_path / 'hub', 'openai-community/gpt2',
                                          ['config.json', 'model.safetensors'])), HF_HUB_OFFLINE='1')
    r = run_script('sample.py', '--init_from=gpt2', *SAMPLE_ARGS, env=env)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr
    assert 'holds config.json, model.safetensors but not vocab.json, merges.txt' in r.stderr
    assert 'HF_HUB_OFFLINE=1' in r.stderr


def test_uncached_hub_name_offline_is_a_clear_error(tmp_path):
    r = run_script('sample.py', '--init_from=gpt2-medium', env=dict(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE='1'))
    assert r.returncode == 2
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr
    assert 'gpt2-medium is not in the Hugging Face cache' in r.stderr and '--init_from=DIR' in r.stderr
    assert '--init_from=smollm2-135m' in r.stderr  # the trained model that works offline is named


def test_no_cache_and_no_network_fails_fast(tmp_path):
    """Without HF_HUB_OFFLINE and with the hub unreachable (a closed local port stands in for
    no network), the error comes at once and says so, instead of after minutes of retries."""
    import time
    env = dict(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE='', HF_ENDPOINT='http://127.0.0.1:9')
    t0 = time.time()
    r = run_script('sample.py', '--init_from=openai-community/gpt2', env=env)
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert '127.0.0.1 cannot be reached (offline?)' in r.stderr and 'not in the Hugging Face cache' in r.stderr
    assert time.time() - t0 < 30  # the model load itself takes seconds; retries would take minutes


def test_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match='neither a directory nor a hub id'):
        gpt2_checkpoint('gpt3')
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(UserError, match='lacks model.safetensors'):
        gpt2_checkpoint(str(tmp_path))


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


def test_gpt_loader_sends_gguf_names_to_the_loader_of_every_family():
    """GPT.from_pretrained loads GPT-2 only; asked for the offline SmolLM2 it names the loader that
    takes it (run.load_pretrained), rather than calling 'smollm2-135m' no hub id."""
    for name in ('smollm2-135m', 'some/model.gguf'):
        with pytest.raises(UserError, match=r"not GPT-2; load it with run.load_pretrained"):
            GPT.from_pretrained(name)
