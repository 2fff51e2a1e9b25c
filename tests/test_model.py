"""The hand-written GPT-2 against transformers' GPT2LMHeadModel, the KV cache, the tokenizer, loading."""
import json
import os
import shutil

import pytest
import torch

from checkpoint import gpt2_checkpoint
from configurator import UserError
from conftest import TINY, make_random_checkpoint, run_script
from decoding import generate
from model import GPT
from tokenizer import encode, load_tokenizer


@pytest.mark.parametrize('shape', [dict(n_embd=32, n_layer=3, n_head=4), dict(n_embd=48, n_layer=2, n_head=3, n_positions=40)])
def test_logits_match_transformers(tmp_path, shape):
    hf = make_random_checkpoint(tmp_path, seed=1, **shape)
    model, _ = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 474, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _, _ = model(idx, all_logits=True)
    assert (logits - expected).abs().max().item() < 1e-4


def test_attention_weights_match_transformers(tmp_path):
    hf = make_random_checkpoint(tmp_path, seed=2, n_layer=2)
    hf.config._attn_implementation = 'eager'
    model, _ = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 474, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx, output_attentions=True).attentions
        _, _, atts = model(idx, return_att=True)
    assert len(atts) == 2
    for a, e in zip(atts, expected):
        assert a.shape == (1, 4, 9, 9)
        assert (a - e).abs().max().item() < 1e-5


def test_kv_cache_last_token_equals_full_pass(tiny):
    """Seed 000's experiment: the last token's logits with a cached prefix equal a full pass."""
    model, _ = tiny
    idx = torch.randint(0, 474, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _, _ = model(idx)
        cache = model.new_cache()
        model(idx[:, :-1], cache=cache)
        cached, present, _ = model(idx[:, -1:], cache=cache)
        # several new tokens at once after a cache
        cache2 = model.new_cache()
        model(idx[:, :30], cache=cache2)
        chunk, _, _ = model(idx[:, 30:], cache=cache2, all_logits=True)
    assert (cached - full).abs().max().item() < 1e-4
    assert (chunk[:, -1:] - full).abs().max().item() < 1e-4
    assert present[0][0].shape == (3, 4, 40, 16) and cache[0].length == 40


def test_plain_generation_equals_full_recompute(tiny):
    """KV-cached decoding draws the same tokens as rerunning the whole context each step,
    also past block_size, where the context window slides."""
    model, _ = tiny
    x = torch.randint(0, 474, (1, 250), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    fast = generate(model, x, 12, temperature=0.8, top_k=200)
    torch.manual_seed(5)
    idx = x
    with torch.no_grad():
        for _ in range(12):
            logits, _, _ = model(idx[:, -model.config.block_size:])
            probs = torch.softmax(torch.where(logits[:, -1] / 0.8 < torch.topk(logits[:, -1] / 0.8, 200).values[:, [-1]],
                                              -float('inf'), logits[:, -1] / 0.8), -1)
            idx = torch.cat((idx, torch.multinomial(probs, 1)), 1)
    assert fast.tolist() == idx.tolist()


def test_tokenizer_matches_transformers():
    from transformers import GPT2Tokenizer
    hf = GPT2Tokenizer(os.path.join(TINY, 'vocab.json'), os.path.join(TINY, 'merges.txt'))
    enc = load_tokenizer(TINY)
    for text in ["\nCats are horrible", "Hello world!  It's 2021, isn't it?\n\n\tTabs", "naïve café — ünïcödé 😀",
                 "the third-largest metropolitan area in Canada is", "   leading spaces", "x<|endoftext|>y"]:
        assert encode(enc, text) == hf.encode(text), text
        assert enc.decode(encode(enc, text)) == text
    assert enc.n_vocab == 474 and enc.eot_token == 473


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


def test_fingerprint_tells_weights_apart(tmp_path):
    make_random_checkpoint(tmp_path / 'a', seed=1)
    make_random_checkpoint(tmp_path / 'b', seed=2)
    a, _ = GPT.from_pretrained(str(tmp_path / 'a'))
    a2, _ = GPT.from_pretrained(str(tmp_path / 'a'))
    b, _ = GPT.from_pretrained(str(tmp_path / 'b'))
    assert a.fingerprint() == a2.fingerprint() != b.fingerprint()


def test_top_layer_on_the_last_position_only_changes_nothing(tiny, reference):
    """forward() runs the top layer for the last position only unless every position's logits
    are asked for; with and without a memory (a memory in the top layer too) it is the same."""
    from build import build_from_text
    from memory import RetrievalSettings
    model, enc = tiny
    idx = torch.randint(0, 474, (2, 33), generator=torch.Generator().manual_seed(8))
    memory = build_from_text(model, enc, reference['memory_text'], layers=[2, 3])
    for mem in (None, memory.retrieving_layers(RetrievalSettings([0, 0, 3, 3], mem_frac=5.0, resid_frac=0.33))):
        model.attach_memory(mem)
        with torch.no_grad():
            last, _, _ = model(idx)
            every, _, _ = model(idx, all_logits=True)
        model.attach_memory(None)
        assert (last[:, 0] - every[:, -1]).abs().max().item() < 1e-5
