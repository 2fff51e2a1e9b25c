"""Exit layers and auto-contrastive decoding (docs/method.md section 6): the contrast formula on
hand-made distributions, exits read from the residual stream after the first i blocks (with
the memory acting inside the blocks), exit_layer = n_layer being ordinary decoding, and the
keys in sample.py and sweeps."""
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'reference', 'tiny-gpt2')
sys.path.insert(0, ROOT)

import sweep
from configurator import UserError
from conftest import TINY_ARG, run_script
from decoding import Decoder, Readout, contrast
from memory import RetrievalSettings
from run import RUN_DEFAULTS, MemorySource, Sampling, continuations, load_model, readout_of
from tokenizer import encode

PROMPT = "\nCats are horrible"
MEMORY = "\nCats are lovely, kind and gentle companions."
TYPE3 = RetrievalSettings([0, 3, 3, 0], 5.0, 0.1, 0.01, False, 0.33)


@pytest.fixture(scope='module')
def tiny():
    torch.set_num_threads(1)
    model, enc = load_model(dict(RUN_DEFAULTS, init_from=TINY))
    memory = MemorySource.from_config(dict(RUN_DEFAULTS, memory=MEMORY)).load(model, enc, [1, 2])
    return model, enc, memory.retrieving_layers(TYPE3)


def reference_contrast(p_u, p_l, alpha):
    """The formula, written out with numpy."""
    p_u, p_l = np.asarray(p_u, float), np.asarray(p_l, float)
    keep = p_u >= alpha * p_u.max()
    keep[p_u.argmax()] = True
    out = p_u.copy()
    ratio = np.exp(np.log(p_u[keep]) - np.log(p_l[keep]))
    out[keep] = ratio / ratio.sum() * p_u[keep].sum()
    return out


@pytest.mark.parametrize('p_u,p_l,alpha', [
    ([0.5, 0.3, 0.15, 0.05], [0.7, 0.1, 0.1, 0.1], 0.25),
    ([0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], 0.25),   # uniform p_L: the kept tokens keep p_U
    ([0.6, 0.2, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], 0.1),           # every token kept
    ([0.9, 0.05, 0.03, 0.02], [0.01, 0.9, 0.05, 0.04], 0.5),     # only the top token kept: it keeps its p
])
def test_contrast_formula_on_hand_made_distributions(p_u, p_l, alpha):
    got = contrast(torch.tensor([p_u]).log(), torch.tensor([p_l]).log(), alpha).exp()[0].double().numpy()
    np.testing.assert_allclose(got, reference_contrast(p_u, p_l, alpha), rtol=1e-5, atol=1e-7)
    assert got.sum() == pytest.approx(1.0, abs=1e-6)


def test_contrasting_an_exit_with_itself_spreads_the_kept_mass_evenly():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = logits.softmax(-1)
    out = contrast(logits, logits, 0.1).exp()
    for row in range(3):
        keep = p[row] >= 0.1 * p[row].max()
        assert keep.sum() > 1
        assert torch.allclose(out[row][keep], p[row][keep].sum() / keep.sum() * torch.ones(int(keep.sum())), atol=1e-6)
        assert torch.allclose(out[row][~keep], p[row][~keep], atol=1e-7)  # below the threshold: unchanged


def exits_by_full_pass(model, seq, retrieval):
    """head(h_i) of the last position for every i, from a full pass over seq with the memory
    attached, block by block (no cache)."""
    model.attach_memory(retrieval)
    try:
        x = model.embed(seq)
        out = {}
        for i, block in enumerate(model.blocks):
            x = block(x, rope=model.rope)[0]
            out[i + 1] = model.head(x[:, -1])
    finally:
        model.attach_memory(None)
    return out


@pytest.mark.parametrize('readout', [Readout(exit_layer=1), Readout(exit_layer=3), Readout(contrast_layers=(4, 2)),
                                     Readout(contrast_layers=(3, 3), contrast_alpha=0.3)])
@pytest.mark.parametrize('with_memory', [False, True])
def test_decoding_reads_the_exits_of_the_full_pass(tiny, readout, with_memory):
    model, enc, retrieval = tiny
    retrieval = retrieval if with_memory else None
    seq = torch.tensor([encode(enc, PROMPT)] * 2)
    nxt = [torch.tensor([[7], [11]]), torch.tensor([[40], [3]])]
    model.attach_memory(retrieval)
    with torch.no_grad():
        dec = Decoder(model, 'exact', capacity=seq.size(1) + 2, readout=readout)
        got = [dec.prefill(seq)] + [dec.step(t) for t in nxt]
    model.attach_memory(None)
    for step, logits in enumerate(got):
        s = torch.cat([seq] + nxt[:step], dim=1)
        with torch.no_grad():
            exits = exits_by_full_pass(model, s, retrieval)
        expected = readout.logits(exits)
        assert torch.allclose(logits, expected, atol=1e-5), (step, (logits - expected).abs().max())


def test_exit_at_the_top_is_ordinary_decoding(tiny):
    model, enc, retrieval = tiny
    ids = encode(enc, PROMPT)
    for mode in ('exact', 'cached'):
        sampling = Sampling(16, 0.8, 200, mode)
        for layers in (None, retrieval):
            plain = continuations(model, ids, [1, 2, 3], sampling, layers)
            top = continuations(model, ids, [1, 2, 3], sampling, layers, readout=Readout(exit_layer=4))
            assert top == plain
    low = continuations(model, ids, [1, 2, 3], Sampling(16, 0.8, 200, 'exact'), retrieval, readout=Readout(exit_layer=2))
    assert low != continuations(model, ids, [1, 2, 3], Sampling(16, 0.8, 200, 'exact'), retrieval)


def test_bad_readouts(tiny):
    model, enc, _ = tiny
    ids, sampling = encode(enc, PROMPT), Sampling(2, 1.0, None, 'exact')
    for readout, fragment in [(Readout(exit_layer=0), 'exit_layer=0 must count blocks from 1 to 4'),
                              (Readout(exit_layer=5), 'from 1 to 4'),
                              (Readout(contrast_layers=(2, 3)), 'contrast_layers=[2, 3] must be [U, L]'),
                              (Readout(exit_layer=2, contrast_layers=(3, 2)), 'alternatives')]:
        with pytest.raises(UserError, match=fragment.replace('[', r'\[').replace(']', r'\]')):
            continuations(model, ids, [1], sampling, readout=readout)
    with pytest.raises(UserError, match='must be \\[U, L\\]'):
        readout_of(dict(RUN_DEFAULTS, contrast_layers=4))


def test_sweeps_grid_over_exits(tiny):
    cfg = dict(sweep.DEFAULTS, init_from=TINY, start=PROMPT, memory=MEMORY, knn_num=[0, 3, 3, 0], baselines=['plain'],
               seeds=2, grid={'exit_layer': [None, 2, 4]})
    settings, _ = sweep.expand(cfg)
    assert len({s['id'] for s in settings}) == len(settings) == 6
    plain_ids = [s['id'] for s in settings if s['method'] == 'plain']
    ordinary, _ = sweep.expand(dict(cfg, grid={}))
    assert ordinary[0]['id'] == plain_ids[0]  # reading the ordinary output keeps the setting's id
    assert [s['label'] for s in settings] == ['plain, final output', 'plain, exit 2', 'plain, exit 4',
                                              'final output', 'exit 2', 'exit 4']


def test_contrasting_an_exit_with_itself_on_the_tiny_checkpoint(tiny):
    """Decoding with contrast_layers=[3, 3]: the kept tokens of exit 3 share their probability
    evenly, the others keep exit 3's probability."""
    model, enc, retrieval = tiny
    x = torch.tensor([encode(enc, PROMPT)])
    with torch.no_grad():
        p = Decoder(model, 'exact', readout=Readout(contrast_layers=(3, 3), contrast_alpha=0.5)).prefill(x).exp()[0]
        p_3 = exits_by_full_pass(model, x, None)[3].softmax(-1)[0]
    keep = p_3 >= 0.5 * p_3.max()
    assert 1 < keep.sum() < p_3.numel()
    assert torch.allclose(p[keep], torch.full((int(keep.sum()),), float(p_3[keep].sum() / keep.sum())), atol=1e-6)
    assert torch.allclose(p[~keep], p_3[~keep], atol=1e-7)


def test_sample_labels_the_plain_text_with_its_readout(tmp_path):
    """Under contrast_layers the plain model's text is read through the contrast too, so it is
    not labelled "Unadulterated" (the reference's label for the ordinary output)."""
    out = tmp_path / 'samples.jsonl'
    r = run_script('sample.py', TINY_ARG, '--knn_num=[0,5,5,0]', f'--memory={MEMORY!r}', '--contrast_layers=[4,2]',
                   '--unadulterated_gpt=True', '--max_new_tokens=2', '--seeds=[1]', f'--out_jsonl={out}')
    assert r.returncode == 0, r.stderr
    labels = [json.loads(line)['label'] for line in out.read_text(encoding='utf-8').splitlines()]
    assert labels[0] == 'GPT-2 without the memory, exit 4 contrasted with exit 2 (alpha 0.1)', labels
    assert 'Unadulterated' not in r.stdout
