"""Looking inside (retrieval_trace.py, attention_maps.py, logit_lens.py) on the tiny
checkpoint: the trace's numbers are recomputed here from the layer's own q, k, v with the
method's steps written out; the heatmaps' arrays are the model's attention weights; the
lens's last exit is the model's output."""
import csv
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'reference', 'tiny-gpt2')
sys.path.insert(0, ROOT)

import attention_maps
import logit_lens
import retrieval_trace
from configurator import configure
from run import prepare_run

MEMORY = "\nCats are lovely, kind and gentle companions who bring joy."
PROMPT = "\nCats are horrible and loud"
SETTINGS = {  # Type 3 (own candidate, r) and Type 2 (resid_only, BF on token 0)
    'type3': ['--knn_num=[0,3,3,0]', '--mem_frac=5.0', '--bookkeeping_frac=0.1', '--knn_softmax_influence=0.01',
              '--resid_frac=0.33'],
    'type2': ['--knn_num=[0,0,5,0]', '--mem_frac=0.0', '--bookkeeping_frac=0.03', '--knn_softmax_influence=1000.0',
              '--resid_only=True', '--resid_frac=0.1'],
}


def args(kind, *more):
    return [f'--init_from={TINY}', f'--memory={MEMORY}', f'--start={PROMPT}', '--seeds=[1338]', *SETTINGS[kind], *more]


def read_csv(path):
    with open(path, encoding='utf-8', newline='') as f:
        return list(csv.DictReader(f))


@torch.no_grad()
def layer_qkv_att(model, seq, layer, retrieval):
    """q, k, v (H, T, d) and the causal softmax attention (H, T, T) of a GPT-2 layer, computed
    here from the block's input in a full pass with the memory attached."""
    seen = []
    handle = model.blocks[layer].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.attach_memory(retrieval)
    try:
        model(seq)
    finally:
        model.attach_memory(None)
        handle.remove()
    block = model.blocks[layer]
    C, H = model.config.n_embd, model.config.n_head
    d = C // H
    q, k, v = block.attn.c_attn(block.ln_1(seen[-1]))[0].split(C, dim=-1)
    q, k, v = (t.view(-1, H, d).transpose(0, 1).double() for t in (q, k, v))
    T = q.size(1)
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float('-inf'))
    return q, k, v, scores.softmax(-1)


def expected_retrievals(q, k, v, att, keys, values, s):
    """docs/method.md section 2, steps 1-6, with loops: {(h, j): (rows, d², weights, own w, |v'-v|, att)}."""
    H, T, d = q.shape
    out = {}
    for h in range(H):
        row = att[h, T - 1]
        for j in range(T):
            a = float(row[j])
            if j == 0 and s['bookkeeping_frac'] != 0 and a <= s['bookkeeping_frac']:
                continue
            if s['mem_frac'] != 0 and a < 1 / (s['mem_frac'] * T):
                continue
            if s['mem_frac'] == 0 and j != 0:
                continue
            dist = ((keys[h].double() - k[h, j]) ** 2).sum(-1)
            rows = dist.argsort()[:s['k']].tolist()
            cand_k, cand_v = [keys[h, r].double() for r in rows], [values[h, r].double() for r in rows]
            if not s['resid_only']:
                cand_k, cand_v = [k[h, j]] + cand_k, [v[h, j]] + cand_v
            w = torch.tensor([float(q[h, j] @ ck) / math.sqrt(d) * s['ts'] for ck in cand_k]).double().softmax(0)
            m = sum(wi * cv for wi, cv in zip(w, cand_v))
            new = (1 - s['r']) * m + s['r'] * v[h, j] if s['r'] else m
            own = float(w[0]) if not s['resid_only'] else None
            out[(h, j)] = (rows, [float(dist[r]) for r in rows], w.tolist()[0 if s['resid_only'] else 1:], own,
                           float((new - v[h, j]).norm()), a)
    return out


@pytest.mark.parametrize('kind', ['type3', 'type2'])
def test_trace_reports_what_the_model_used(tmp_path, kind):
    torch.set_num_threads(1)
    config = configure(retrieval_trace.DEFAULTS, args(kind, '--steps=3', f'--out_dir={tmp_path}'))
    retrieval_trace.main(args(kind, '--steps=3', f'--out_dir={tmp_path}'))
    rows = read_csv(tmp_path / 'trace.csv')
    assert rows
    r = prepare_run(config, progress=False)
    generated = []
    for step in range(3):
        mine = [x for x in rows if int(x['step']) == step]
        # the sequence at this step: the prompt and the tokens generated before it
        seq = torch.tensor([r.ids + generated])
        for layer, lm in sorted(r.retrieval.items()):
            q, k, v, att = layer_qkv_att(r.model, seq, layer, r.retrieval)
            s = dict(bookkeeping_frac=lm.settings.bookkeeping_frac, mem_frac=lm.settings.mem_frac, k=lm.k,
                     resid_only=lm.settings.resid_only, ts=lm.settings.knn_softmax_influence, r=lm.settings.resid_frac)
            expected = expected_retrievals(q, k, v, att, lm.keys, lm.values, s)
            got = {}
            for x in mine:
                if int(x['layer']) == layer:
                    got.setdefault((int(x['head']), int(x['position'])), []).append(x)
            assert set(got) == set(expected), (step, layer)
            for key, recs in got.items():
                rows_e, dist_e, w_e, own_e, change_e, att_e = expected[key]
                assert [int(x['row']) for x in recs] == rows_e
                np.testing.assert_allclose([float(x['distance']) for x in recs], dist_e, rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose([float(x['weight']) for x in recs], w_e, rtol=1e-4, atol=1e-6)
                if own_e is None:
                    assert recs[0]['own_weight'] == ''
                else:
                    assert float(recs[0]['own_weight']) == pytest.approx(own_e, rel=1e-4, abs=1e-6)
                assert float(recs[0]['value_change']) == pytest.approx(change_e, rel=1e-4, abs=1e-5)
                assert float(recs[0]['attention']) == pytest.approx(att_e, rel=1e-4, abs=1e-6)
                assert recs[0]['token'] == r.enc.decode([seq[0, key[1]].item()])
                stored = r.memory.stored_token_ids()
                assert [x['stored_token'] for x in recs] == [r.enc.decode([stored[i]]) for i in rows_e]
        # the token this step chose, as the trace names it, continues the sequence
        token = {x['next_token'] for x in mine}
        assert len(token) == 1
        generated += r.enc.encode(token.pop())


def test_trace_prints_tables_and_summaries(tmp_path, capsys):
    retrieval_trace.main(args('type3', '--steps=2', '--show=2', f'--out_dir={tmp_path}'))
    out = capsys.readouterr().out
    assert 'step 0 -> next token' in out and 'step 1 -> next token' in out and 'layer 2:' in out
    assert "|v'-v|" in out and 'more token-heads in trace.csv' in out
    assert 'most retrieved:' in out and 'token-heads selected per step' in out


def test_attention_maps_files_hold_the_models_weights(tmp_path):
    attention_maps.main(args('type3', '--heads=[0,2]', f'--out_dir={tmp_path}'))
    tokens = json.loads((tmp_path / 'tokens.json').read_text())
    assert tokens['layers'] == [1, 2, 3] and tokens['heads'] == [0, 2]
    for layer in (1, 2, 3):
        for head in (0, 2):
            assert (tmp_path / f'layer{layer}_head{head}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    from safetensors.torch import load_file
    arrays = load_file(str(tmp_path / 'attention.safetensors'))
    config = configure(attention_maps.DEFAULTS, args('type3'))
    r = prepare_run(config, progress=False)
    x = torch.tensor([r.ids])
    _, _, plain = r.model(x, return_att=True)
    r.model.attach_memory(r.retrieval)
    _, _, mem = r.model(x, return_att=True)
    r.model.attach_memory(None)
    for layer in (1, 2, 3):
        assert torch.allclose(arrays[f'plain.layer{layer}'], plain[layer][0], atol=1e-6)
        assert torch.allclose(arrays[f'memory.layer{layer}'], mem[layer][0], atol=1e-6)
    # the first memory layer's weights are the plain ones; the layer above it sees changed values
    assert torch.allclose(arrays['memory.layer1'], arrays['plain.layer1'], atol=1e-7)
    assert not torch.allclose(arrays['memory.layer3'], arrays['plain.layer3'], atol=1e-5)
    assert len(tokens['tokens']) == len(r.ids) == arrays['plain.layer1'].shape[-1]


def test_logit_lens_reads_every_exit(tmp_path, capsys):
    logit_lens.main(args('type3', '--top=4', f'--out_dir={tmp_path}'))
    out = capsys.readouterr().out
    assert 'KL(mem||plain)' in out
    rows = read_csv(tmp_path / 'lens.csv')
    assert len(rows) == 4 * 2 * 4  # exits x variants x top
    assert (tmp_path / 'lens.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    config = configure(logit_lens.DEFAULTS, args('type3'))
    r = prepare_run(config, progress=False)
    x = torch.tensor([r.ids])
    for variant, layers in (('plain', None), ('memory', r.retrieval)):
        r.model.attach_memory(layers)
        p = r.model(x)[0][0, -1].softmax(-1)
        exit2 = r.model.exits(x)[2][0].softmax(-1)
        r.model.attach_memory(None)
        top = [x for x in rows if x['variant'] == variant and x['exit'] == '4']
        assert [int(x['token_id']) for x in top] == p.topk(4).indices.tolist()
        np.testing.assert_allclose([float(x['prob']) for x in top], p.topk(4).values.tolist(), rtol=1e-5)
        second = [x for x in rows if x['variant'] == variant and x['exit'] == '2']
        assert [int(x['token_id']) for x in second] == exit2.topk(4).indices.tolist()


def test_script_names_do_not_shadow_the_standard_library():
    names = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}
    assert not names & set(sys.stdlib_module_names)


def test_trace_of_retrieval_attention_reports_the_weights_the_model_used(tmp_path, capsys):
    """memory_mode='attention': per head, the newest query's retrieved rows, their cosine and
    weight, and the memory's share of that query's attention, as the layer computed them."""
    argv = [f'--init_from={TINY}', '--knn_num=[0,4,4,0]', f'--memory={MEMORY}', '--memory_mode=attention',
            '--start=\nCats are horrible', '--steps=2', '--seeds=[7]', f'--out_dir={tmp_path}']
    retrieval_trace.main(argv)
    out = capsys.readouterr().out
    assert "retrieves (memory: its share of the attention)" in out and 'cosine weight' in out
    with open(tmp_path / 'trace.csv', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r['similarity'] and r['memory_share'] for r in rows)
    # per (step, layer, head): at most k rows; weights non-negative and summing to the memory's share
    from collections import defaultdict
    groups = defaultdict(list)
    for r in rows:
        groups[(r['step'], r['layer'], r['head'])].append(r)
    for recs in groups.values():
        assert len(recs) <= 4
        total = sum(float(r['weight']) for r in recs)
        assert total == pytest.approx(float(recs[0]['memory_share']), abs=1e-5)
        assert all(-1 <= float(r['similarity']) <= 1 for r in recs)
