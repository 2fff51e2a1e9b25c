"""Activation addition (docs/method.md section 9) on the tiny checkpoint: the residual stream
entering the steered block changes by exactly c * (h+ - h-) at the front positions and
nowhere else, in a full pass and while decoding; c = 0 is the plain model; the KV cache
stays exact; the sweep's 'actadd' baseline."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'reference', 'tiny-gpt2')
sys.path.insert(0, ROOT)

import sweep  # noqa: E402
from actadd import ActAdd  # noqa: E402
from configurator import UserError  # noqa: E402
from decoding import Decoder  # noqa: E402
from run import RUN_DEFAULTS, Sampling, continuations, load_model  # noqa: E402
from tokenizer import encode  # noqa: E402

PROMPT = "\nCats are horrible and loud at night"


@pytest.fixture(scope='module')
def tiny():
    torch.set_num_threads(1)
    return load_model(dict(RUN_DEFAULTS, init_from=TINY))


def block_inputs(model, layer):
    """A hook that records what enters block `layer` on every call."""
    seen = []
    handle = model.blocks[layer].register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    return seen, handle


def residual_entering(model, ids, layer):
    """h entering block `layer` for token ids, computed here with the blocks one by one."""
    x = model.embed(torch.tensor([ids]))
    for b in model.blocks[:layer]:
        x = b(x)[0]
    return x[0]


@pytest.mark.parametrize('layer,coeff', [(0, 5.0), (2, -3.0), (3, 0.5)])
def test_the_residual_stream_changes_by_c_times_the_difference_at_the_front_only(tiny, layer, coeff):
    model, enc = tiny
    act = ActAdd(('Love', 'Hate and anger'), layer, coeff)
    ids_plus, ids_minus = encode(enc, 'Love'), encode(enc, 'Hate and anger')
    n = max(len(ids_plus), len(ids_minus))
    assert len(ids_plus) < n  # so the padding with the space token is exercised
    space = encode(enc, ' ')
    expected = coeff * (residual_entering(model, ids_plus + space * (n - len(ids_plus)), layer)
                        - residual_entering(model, ids_minus + space * (n - len(ids_minus)), layer))
    steering = act.steering(model, enc)
    assert torch.allclose(steering.delta, expected, atol=1e-5)

    ids = encode(enc, PROMPT)
    assert len(ids) > n
    with torch.no_grad():
        seen, handle = block_inputs(model, layer)
        model(torch.tensor([ids]), all_logits=True)
        model.steering = steering
        model(torch.tensor([ids]), all_logits=True)
        model.steering = None
        handle.remove()
    plain, steered = seen
    diff = (steered - plain)[0]
    assert torch.allclose(diff[:n], expected, atol=1e-5)
    assert torch.equal(diff[n:], torch.zeros_like(diff[n:]))


def test_decoding_steers_only_the_front_and_the_cache_stays_exact(tiny):
    """Exact and cached decoding with a KV cache give the logits of a full pass over the whole
    sequence at every step; the new positions enter the steered block unchanged."""
    model, enc = tiny
    steering = ActAdd(('Love', 'Hate'), 1, 4.0).steering(model, enc)
    ids = torch.tensor([encode(enc, PROMPT)] * 2)
    nxt = torch.tensor([[5], [9]])
    with torch.no_grad():
        model.steering = steering
        for mode in ('exact', 'cached'):
            dec = Decoder(model, mode, capacity=ids.size(1) + 3)
            seen, handle = block_inputs(model, 1)
            first = dec.prefill(ids)
            second = dec.step(nxt)
            handle.remove()
            full = torch.cat((ids, nxt), 1)
            ref_logits, _, _ = model(full, all_logits=True)
            assert torch.allclose(first, ref_logits[:, -2], atol=1e-5)
            assert torch.allclose(second, ref_logits[:, -1], atol=1e-5)
            # the step's new position entered block 1 as it would without steering
            model.steering = None
            seen_plain, handle = block_inputs(model, 1)
            model(full)
            handle.remove()
            model.steering = steering
            assert torch.allclose(seen[-1][:, -1], seen_plain[-1][:, -1], atol=1e-6)
        model.steering = None


def test_coefficient_zero_is_the_plain_model(tiny):
    model, enc = tiny
    ids = encode(enc, PROMPT)
    sampling = Sampling(12, 0.8, 200, 'exact')
    plain = continuations(model, ids, [1, 2, 3], sampling)
    zero = continuations(model, ids, [1, 2, 3], sampling, steering=ActAdd(('Love', 'Hate'), 2, 0.0).steering(model, enc))
    assert zero == plain
    assert model.steering is None  # continuations leaves the model plain
    with torch.no_grad():  # and c = 0 changes no logit, where a large c does
        x = torch.tensor([ids])
        logits = model(x)[0]
        model.steering = ActAdd(('Love', 'Hate'), 2, 0.0).steering(model, enc)
        assert torch.equal(model(x)[0], logits)
        model.steering = ActAdd(('Love', 'Hate'), 0, 50.0).steering(model, enc)
        assert (model(x)[0] - logits).abs().max() > 1e-2
        model.steering = None


def test_bad_actadd_settings(tiny):
    model, enc = tiny
    with pytest.raises(UserError, match='blocks 0..3'):
        ActAdd(('Love', 'Hate'), 4, 1.0).steering(model, enc)
    with pytest.raises(UserError, match='two non-empty strings'):
        ActAdd.from_config(dict(actadd_prompts=['Love'], actadd_layer=1, actadd_coeff=1.0))
    steering = ActAdd(('Love and kindness forever more', 'Hate'), 1, 1.0).steering(model, enc)
    with pytest.raises(UserError, match='the prompt has 1 tokens'):
        continuations(model, encode(enc, 'x'), [1], Sampling(2, 1.0, None, 'exact'), steering=steering)


def test_sweep_actadd_baseline(tmp_path, tiny):
    model, enc = tiny
    cfg = dict(sweep.DEFAULTS, init_from=TINY, start=PROMPT, memory="\nCats are lovely.", knn_num=[0, 3, 3, 0],
               baselines=['plain', 'actadd'], seeds=2, max_new_tokens=6, actadd_layer=1,
               grid={'actadd_coeff': [1.0, 8.0], 'mem_frac': [1.0, 5.0]})
    settings, seeds = sweep.expand(cfg)
    assert [s['label'] for s in settings] == ['plain', 'actadd Love-Hate L1 c 1', 'actadd Love-Hate L1 c 8',
                                              'MF 1', 'MF 5']
    # the plain baseline's id does not depend on the ActAdd keys
    other, _ = sweep.expand(dict(cfg, actadd_layer=2, grid={'mem_frac': [1.0]}))
    assert other[0]['id'] == settings[0]['id']
    out = tmp_path / 'out'
    cfg_file = tmp_path / 'sweep_actadd.py'
    cfg_file.write_text('\n'.join(f"{k} = {v!r}" for k, v in cfg.items() if k in sweep.DEFAULTS and k != 'name'))
    sweep.main([str(cfg_file), f'--out_dir={out}'])
    import json
    rows = [json.loads(line) for line in (out / 'samples.jsonl').read_text().splitlines()]
    act = [r for r in rows if r['label'] == 'actadd Love-Hate L1 c 8']
    steering = ActAdd(('Love', 'Hate'), 1, 8.0).steering(model, enc)
    expected = continuations(model, encode(enc, PROMPT), seeds, Sampling(6, 0.8, 200, 'exact'), steering=steering)
    assert [r['tokens'] for r in act] == expected
    # every record says what produced it
    fingerprint = model.fingerprint()
    for r in rows:
        assert r['model']['fingerprint'] == fingerprint and r['prompt'] == PROMPT
        assert r['sampling'] == dict(max_new_tokens=6, temperature=0.8, top_k=200, decoding='exact')
        assert (r['actadd'] is not None) == (r['method'] == 'actadd')
        assert (r['memory'] is not None) == (r['method'] == 'memory') == (r['retrieval'] is not None)
    assert act[0]['actadd'] == dict(prompts=['Love', 'Hate'], layer=1, coeff=8.0)
    from run import MemorySource
    mem = next(r for r in rows if r['method'] == 'memory')
    built = MemorySource.from_config(dict(sweep.DEFAULTS, **cfg)).load(model, enc, [1, 2])
    assert mem['memory']['identity'] == built.identity() and mem['search'] == 'faiss'
    assert mem['retrieval']['knn_num'] == [0, 3, 3, 0] and mem['retrieval']['mem_frac'] in (1.0, 5.0)
    with pytest.raises(UserError, match="baselines="):
        sweep.expand(dict(cfg, baselines=['actad']))
    with pytest.raises(UserError, match='blocks 0..3'):
        sweep.main([str(cfg_file), f'--out_dir={tmp_path / "o2"}', '--actadd_layer=7'])
