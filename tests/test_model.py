"""The hand-written GPT-2 against transformers' GPT2LMHeadModel: logits, attention weights, the
KV cache, generation against full recomputation, fingerprints."""

import pytest
import torch

from conftest import make_random_checkpoint
from decoding import generate
from model import GPT


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
