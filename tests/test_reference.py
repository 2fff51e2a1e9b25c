"""Fidelity: our outputs against what the reference implementation produced on the fixture."""
import os

import pytest
import torch
from safetensors.torch import load_file

from build import build_from_text
from conftest import REF
from decoding import generate
from memory import RetrievalSettings
from store import load_memory
from tokenizer import encode

CASES = ['type1_all_layers', 'type2_recall_one_layer', 'type3_sentiment_two_layers']


def case_of(reference, name):
    return next(c for c in reference['cases'] if c['name'] == name)


def use(memory, case):
    return memory.retrieving_layers(RetrievalSettings(case['knn_num'], case['mem_frac'], case['bookkeeping_frac'],
                                                      case['knn_softmax_influence'], case['resid_only'],
                                                      case['resid_frac']))


def build(tiny, reference, case):
    model, enc = tiny
    layers = [i for i, k in enumerate(case['knn_num']) if k > 0]
    return build_from_text(model, enc, reference['memory_text'], layers=layers,
                        remove_bookkeeping_token_mem_size=reference['bookkeeping_tokens_removed'])


def test_tokenizer_reproduces_reference_ids(tiny, reference):
    _, enc = tiny
    assert encode(enc, reference['memory_text']) == reference['memory_ids']
    assert encode(enc, reference['prompt']) == reference['prompt_ids']
    assert enc.decode(reference['memory_ids']) == reference['memory_text']


@pytest.mark.parametrize('name', CASES)
def test_stored_keys_values_match_reference(tiny, reference, name):
    memory = build(tiny, reference, case_of(reference, name))
    kv = load_file(os.path.join(REF, 'memory_kv.safetensors'))
    for layer in memory.stored_layers:
        assert memory.keys[layer].shape == kv[f'{name}.layer{layer}.keys'].shape
        torch.testing.assert_close(memory.keys[layer], kv[f'{name}.layer{layer}.keys'], atol=1e-5, rtol=0)
        torch.testing.assert_close(memory.values[layer], kv[f'{name}.layer{layer}.values'], atol=1e-5, rtol=0)
    assert {f'{name}.layer{l}.keys' for l in memory.stored_layers} == {k for k in kv if k.startswith(name) and k.endswith('keys')}


def generate_single(model, x, seed, n):
    """The reference's way: global seed, one sequence."""
    torch.manual_seed(seed)
    return generate(model, x, n, temperature=0.8, top_k=200)[0, x.size(1):].tolist()


@pytest.mark.parametrize('source', ['built', 'legacy'])
@pytest.mark.parametrize('name', CASES)
def test_memory_generation_matches_reference(tiny, reference, name, source):
    model, enc = tiny
    case = case_of(reference, name)
    if source == 'built':
        memory = build(tiny, reference, case)
    else:
        memory = load_memory(os.path.join(REF, 'legacy-memstores', name, 'memstore'), model, enc)
    model.attach_memory(use(memory, case))
    try:
        x = torch.tensor([reference['prompt_ids']])
        logits, _, _ = model(x)
        expected = torch.tensor(case['first_step_logits'])
        assert (logits[0, -1] - expected).abs().max().item() < 1e-4
        n = reference['max_new_tokens']
        for seed in reference['seeds']:
            assert generate_single(model, x, seed, n) == case['continuations'][str(seed)], seed
        # all seeds as one batch, one generator per row
        seeds = reference['seeds']
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        y = generate(model, x.repeat(len(seeds), 1), n, temperature=0.8, top_k=200, generators=gens)
        for row, seed in zip(y, seeds):
            assert row[x.size(1):].tolist() == case['continuations'][str(seed)], seed
    finally:
        model.attach_memory(None)


def test_plain_generation_matches_reference(tiny, reference):
    model, _ = tiny
    x = torch.tensor([reference['prompt_ids']])
    for seed in reference['seeds']:
        assert generate_single(model, x, seed, reference['max_new_tokens']) == reference['unadulterated'][str(seed)]


def test_the_memory_changes_something(tiny, reference):
    """Guard against a vacuous pass: with the memory, first-step logits move away from the plain
    model's in every case, and continuations change in some."""
    model, _ = tiny
    plain, _, _ = model(torch.tensor([reference['prompt_ids']]))
    for case in reference['cases']:
        assert (torch.tensor(case['first_step_logits']) - plain[0, -1]).abs().max() > 1e-3, case['name']
    assert any(case['continuations'][s] != reference['unadulterated'][s]
               for case in reference['cases'] for s in case['continuations'])


def test_legacy_import_reads_text_and_drops_sentinel(tiny, reference):
    model, enc = tiny
    memory = load_memory(os.path.join(REF, 'legacy-memstores', 'type3_sentiment_two_layers', 'memstore'), model, enc)
    assert memory.stored_layers == [1, 2]
    assert memory.meta['text'].startswith('\nCats are curious')
    assert memory.keys[1].shape == (4, len(reference['memory_ids']) - 1, 16)
    assert torch.isfinite(memory.keys[1]).all()
