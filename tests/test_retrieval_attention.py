"""Retrieval attention (docs/method.md section 10, retrieval_attention.py): the section's
invariant (no position information: a memory of X read in every layer with k >= its size gives
at the prompt's positions exactly the plain model on X followed by the prompt), k = 0 is the
plain model, step-by-step decoding with an ordinary KV cache equals a full pass every step,
exact equals cached, a batch equals one by one, grouped-query heads and both key forms against
the steps written out as loops, and bad combinations are one-line errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from build import build_from_ids, build_from_text
from configurator import UserError
from conftest import TINY, TINY_ARG, make_llama_checkpoint, one_line_error, run_script
from decoding import generate
from memory import RetrievalSettings
from model import GPT
from run import load_pretrained
from tokenizer import encode

X = "\nCats are lovely, kind and gentle companions that purr."
P = "\nThe cat sat on the mat"


def attention_settings(n_layer, layers, k, threshold=None):
    return RetrievalSettings([k if i in layers else 0 for i in range(n_layer)], memory_mode='attention',
                             memory_sim_threshold=threshold)


@pytest.fixture(scope='module')
def positionless():
    """The tiny GPT-2 with its position embeddings zeroed: a model without position information."""
    model, enc = GPT.from_pretrained(TINY)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    return model, enc


@pytest.mark.parametrize('search', ['faiss', 'torch'])
def test_the_invariant_of_section_10(positionless, search):
    model, enc = positionless
    x, p = encode(enc, X), encode(enc, P)
    memory = build_from_ids(model, x, layers=list(range(4)), n_skip=0)
    layers = memory.retrieving_layers(attention_settings(4, range(4), len(x)), 'cpu', search)
    model.attach_memory(layers)
    try:
        with torch.no_grad():
            got, _, _ = model(torch.tensor([p]), all_logits=True)
    finally:
        model.attach_memory(None)
    with torch.no_grad():
        want, _, _ = model(torch.tensor([x + p]), all_logits=True)
    assert (got[0] - want[0, len(x):]).abs().max().item() < 1e-4
    share = layers[0].last_retrieval.memory_share
    assert share.shape == (1, 4, len(p)) and (share > 0).all()


def test_k_zero_is_the_plain_model_and_decoding_is_exact_with_a_kv_cache():
    model, enc = GPT.from_pretrained(TINY)
    memory = build_from_text(model, enc, X, layers=[1, 2])
    prompt = torch.tensor([encode(enc, P)] * 3)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    with torch.no_grad():
        plain = generate(model, prompt, 12, 0.8, 200, generators=gens())
        model.attach_memory({})
        assert torch.equal(generate(model, prompt, 12, 0.8, 200, generators=gens()), plain)
        model.attach_memory(memory.retrieving_layers(attention_settings(4, [1, 2], 5)))
        exact = generate(model, prompt, 12, 0.8, 200, generators=gens(), mode='exact')
        cached = generate(model, prompt, 12, 0.8, 200, generators=gens(), mode='cached')
        one_by_one = torch.cat([generate(model, prompt[:1], 12, 0.8, 200, generators=[g]) for g in gens()])
        # a full pass over the whole sequence every step, as the reference decodes
        full = prompt[:1]
        g = torch.Generator().manual_seed(1)
        from decoding import sample_next
        for _ in range(12):
            logits, _, _ = model(full)
            full = torch.cat((full, sample_next(logits[:, -1], 0.8, 200, [g])), 1)
        model.attach_memory(None)
    assert torch.equal(exact, cached) and torch.equal(exact, one_by_one) and torch.equal(exact[:1], full)
    assert not torch.equal(exact, plain)  # the memory does something


def loops(q_rot, k_rot, v, q_mem, keys, values, k, group, threshold=None):
    """Steps 1-3 of section 10 for every (b, h, i), written out."""
    B, H, T, d = q_rot.shape
    y = torch.zeros_like(q_rot)
    for b in range(B):
        for h in range(H):
            g = h // group
            unit = F.normalize(keys[g], dim=-1)
            for i in range(T):
                sims = unit @ F.normalize(q_mem[b, h, i], dim=0)
                rows = sims.topk(min(k, keys.size(1))).indices
                rows = [r for r in rows.tolist() if threshold is None or sims[r] > threshold]
                logits = [q_mem[b, h, i] @ keys[g, r] / math.sqrt(d) for r in rows] + \
                         [q_rot[b, h, i] @ k_rot[b, g, j] / math.sqrt(d) for j in range(i + 1)]
                w = torch.softmax(torch.stack(logits), 0)
                y[b, h, i] = sum(w[n] * values[g, r] for n, r in enumerate(rows)) + \
                    sum(w[len(rows) + j] * v[b, g, j] for j in range(i + 1))
    return y


@pytest.mark.parametrize('memory_keys', ['unrotated', 'rotated'])
@pytest.mark.parametrize('threshold', [None, 0.1])
def test_grouped_query_heads_and_key_forms_against_loops(tmp_path_factory, memory_keys, threshold):
    path = tmp_path_factory.mktemp('llama_ra')
    make_llama_checkpoint(path, 'llama', seed=4)
    model, enc = load_pretrained(str(path))
    memory = build_from_text(model, enc, X, layers=[1], memory_keys=memory_keys)
    layer = memory.retrieving_layers(attention_settings(4, [1], 4, threshold))[1]
    seen = {}
    real = layer.attend

    def spy(q_rot, k_rot, v, q_mem, mask=None):
        seen.update(q_rot=q_rot, k_rot=k_rot, v=v, q_mem=q_mem)
        return real(q_rot, k_rot, v, q_mem, mask)
    layer.attend = spy
    model.attach_memory({1: layer})
    try:
        with torch.no_grad():
            model(torch.tensor([encode(enc, P)] * 2))
    finally:
        model.attach_memory(None)
    group = model.config.n_head // model.config.n_kv_head
    with torch.no_grad():
        y, _ = real(seen['q_rot'], seen['k_rot'], seen['v'], seen['q_mem'],
                    torch.ones(seen['q_rot'].size(2), seen['k_rot'].size(2), dtype=torch.bool).tril())
        want = loops(seen['q_rot'], seen['k_rot'], seen['v'], seen['q_mem'], layer.keys, layer.values, 4, group,
                     threshold)
    assert (y - want).abs().max().item() < 1e-5
    if memory_keys == 'unrotated':
        assert not torch.allclose(seen['q_mem'], seen['q_rot'])  # the search used the query before RoPE


def test_bad_combinations_are_one_line_errors():
    with pytest.raises(UserError, match="do not apply with memory_mode='attention'"):
        RetrievalSettings([0, 5, 5, 0], mem_frac=5.0, memory_mode='attention')
    with pytest.raises(UserError, match="memory_mode='cosine' must be"):
        RetrievalSettings([0, 5, 5, 0], memory_mode='cosine')
    with pytest.raises(UserError, match='for memory_mode=.attention. only'):
        RetrievalSettings([0, 5, 5, 0], memory_sim_threshold=0.5)
    with pytest.raises(UserError, match=r'a cosine in \[-1, 1\)'):
        RetrievalSettings([0, 5, 5, 0], memory_mode='attention', memory_sim_threshold=2.0)
    r = run_script('sample.py', TINY_ARG, '--knn_num=[0,5,5,0]', "--memory=\nCats.", '--memory_mode=attention',
                   '--resid_frac=0.3', '--max_new_tokens=1', '--seeds=[1]')
    one_line_error(r, "resid_frac=0.3", "do not apply with memory_mode='attention'")
    r = run_script('sample.py', TINY_ARG, '--knn_num=[0,5,5,0]', "--memory=\nCats are kind.", '--memory_mode=attention',
                   '--max_new_tokens=3', '--seeds=[1]')
    assert r.returncode == 0, r.stderr
    # the write-up's mode keeps the records (and sweep ids) it had
    assert 'memory_mode' not in RetrievalSettings([0, 5, 5, 0]).as_dict()


def test_a_sweep_reads_the_memory_the_way_its_grid_says(tmp_path):
    """memory_mode in a grid reaches the run (a sweep once built value-mode settings for it):
    the attention setting's tokens are sample.py's with memory_mode='attention', and differ
    from the value mode's."""
    import json
    cfg = tmp_path / 'sweep_modes.py'
    cfg.write_text(f"init_from = {TINY!r}\nmemory = {X!r}\nstart = {P!r}\nknn_num = [0, 5, 5, 0]\nseeds = 2\n"
                   "max_new_tokens = 6\nplots = False\n"
                   "grid = {('memory_mode', 'mem_frac'): [('values', 5.0), ('attention', 0.0)]}\n", encoding='utf-8')
    assert run_script('sweep.py', str(cfg), f'--out_dir={tmp_path / "out"}').returncode == 0
    rows = [json.loads(line) for line in (tmp_path / 'out' / 'samples.jsonl').read_text().splitlines()]
    by_mode = {r['setting']['memory_mode']: [x['tokens'] for x in rows if x['setting'] == r['setting']] for r in rows}
    out = tmp_path / 's.jsonl'
    r = run_script('sample.py', TINY_ARG, f'--memory={X}', f'--start={P}', '--knn_num=[0,5,5,0]',
                   '--memory_mode=attention', '--seeds=[1337,1338]', '--max_new_tokens=6', f'--out_jsonl={out}')
    assert r.returncode == 0, r.stderr
    sampled = [json.loads(line)['tokens'] for line in out.read_text().splitlines()]
    assert by_mode['attention'] == sampled and by_mode['values'] != sampled
