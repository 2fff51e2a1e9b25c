"""Recall by answer probability (run.answer_scores): the log-probability of an answer's tokens
equals a full recompute of every step (the reference's way of decoding), memory on and off,
exact decoding; cached decoding is its own Decoder's; several answers in one batch equal one at
a time; recall sweeps record it per setting and summarise it."""
import json
import math

import pytest
import torch

from build import build_from_text
from conftest import TINY, run_script
from memory import RetrievalSettings
from model import GPT
from run import answer_scores, answer_tokens, memory_text
from tokenizer import encode

PROMPT = "\nThe cat sat on the"
ANSWERS = ['mat', 'city of Vancouver', 'lib']


@pytest.fixture(scope='module')
def tiny():
    model, enc = GPT.from_pretrained(TINY)
    memory = build_from_text(model, enc, memory_text("\nThe cat sat on the mat in the city of Vancouver.", ''),
                             layers=[1, 2])
    settings = RetrievalSettings([0, 5, 5, 0], 5.0, 0.1, 1.0, True, 0.1)
    return model, enc, memory.retrieving_layers(settings)


def full_recompute_logprob(model, ids, answer, retrieval):
    """log p(answer | prompt): each token's probability from a whole forward pass over the
    prompt and the answer's tokens so far, the memory selecting on that sequence's last row."""
    model.attach_memory(retrieval)
    try:
        total = 0.0
        for t, tok in enumerate(answer):
            logits, _, _ = model(torch.tensor([ids + answer[:t]]))
            total += torch.log_softmax(logits[0, -1].double(), -1)[tok].item()
    finally:
        model.attach_memory(None)
    return total


@pytest.mark.parametrize('with_memory', [False, True])
def test_answer_logprob_equals_a_full_recompute_of_every_step(tiny, with_memory):
    model, enc, retrieval = tiny
    ids = encode(enc, PROMPT)
    layers = retrieval if with_memory else None
    with torch.no_grad():
        got = answer_scores(model, enc, PROMPT, ids, ANSWERS, 'exact', layers)
        want = [full_recompute_logprob(model, ids, answer_tokens(enc, PROMPT, ids, a), layers) for a in ANSWERS]
    assert got['answer_logprobs'] == pytest.approx(want, abs=1e-4)
    best = max(range(3), key=lambda i: want[i])
    assert got['answer'] == ANSWERS[best] and got['answer_prob'] == pytest.approx(math.exp(want[best]), rel=1e-3)
    model.attach_memory(layers)
    try:
        with torch.no_grad():
            logits, _, _ = model(torch.tensor([ids]))
    finally:
        model.attach_memory(None)
    first = answer_tokens(enc, PROMPT, ids, ANSWERS[best])[0]
    assert got['answer_top1'] == int(logits[0, -1].argmax().item() == first)


def test_a_batch_of_answers_equals_one_at_a_time_and_cached_mode_is_its_own(tiny):
    model, enc, retrieval = tiny
    ids = encode(enc, PROMPT)
    with torch.no_grad():
        together = answer_scores(model, enc, PROMPT, ids, ANSWERS, 'exact', retrieval)['answer_logprobs']
        alone = [answer_scores(model, enc, PROMPT, ids, [a], 'exact', retrieval)['answer_logprobs'][0] for a in ANSWERS]
        cached = answer_scores(model, enc, PROMPT, ids, ANSWERS, 'cached', retrieval)['answer_logprobs']
        plain = answer_scores(model, enc, PROMPT, ids, ANSWERS, 'cached')['answer_logprobs']
        plain_exact = answer_scores(model, enc, PROMPT, ids, ANSWERS, 'exact')['answer_logprobs']
    assert together == pytest.approx(alone, abs=1e-5)
    assert plain == pytest.approx(plain_exact, abs=1e-5)  # no memory: the modes are one
    assert cached != pytest.approx(together, abs=1e-6)  # with a memory, the approximation differs (slightly)
    assert cached == pytest.approx(together, abs=0.5)


def test_answer_tokens_continue_the_prompt(tiny):
    _, enc, _ = tiny
    ids = encode(enc, PROMPT)
    toks = answer_tokens(enc, PROMPT, ids, 'mat')
    assert encode(enc, PROMPT + ' mat') == ids + toks


def test_recall_sweeps_record_and_summarise_the_answer_probability(tmp_path):
    cfg = tmp_path / 'sweep_ap.py'
    cfg.write_text(f"init_from = {TINY!r}\nmemory = '\\nThe cat sat on the mat.'\nstart = {PROMPT!r}\n"
                   "knn_num = [0, 5, 5, 0]\nmetric = 'recall'\nanswers = ['mat']\nseeds = 2\nmax_new_tokens = 2\n"
                   "baselines = ['plain', 'context']\nplots = False\n", encoding='utf-8')
    r = run_script('sweep.py', str(cfg), f'--out_dir={tmp_path / "out"}')
    assert r.returncode == 0, r.stderr[-2000:]
    summary = (tmp_path / 'out' / 'summary.csv').read_text()
    assert 'answer_prob' in summary.splitlines()[0] and 'p(answer)' in r.stdout
    rec = json.loads(next((tmp_path / 'out' / 'settings').glob('*.json')).read_text())
    assert set(rec['answer_scores']) == {'answer', 'answer_logprob', 'answer_prob', 'answer_top1', 'answer_logprobs'}


def test_an_answer_sweep_samples_nothing_and_gives_what_the_recall_sweep_records(tmp_path):
    """metric='answer': no seeds, one results.csv row per setting, answer.png; the same
    probabilities as metric='recall' records for the same settings."""
    cfg = tmp_path / 'sweep_answer.py'
    cfg.write_text(f"init_from = {TINY!r}\nmemory = '\\nThe cat sat on the mat.'\nstart = {PROMPT!r}\n"
                   "knn_num = [0, 5, 5, 0]\nanswers = ['mat', 'lib']\nseeds = 2\nmax_new_tokens = 2\n"
                   "baselines = ['plain', 'context']\n", encoding='utf-8')
    runs = {}
    for metric in ('answer', 'recall'):
        out = tmp_path / metric
        r = run_script('sweep.py', str(cfg), f'--metric={metric}', f'--out_dir={out}')
        assert r.returncode == 0, r.stderr[-2000:]
        recs = [json.loads(p.read_text()) for p in (out / 'settings').glob('*.json')]
        runs[metric] = {rec['method']: rec for rec in recs}
    for method, rec in runs['answer'].items():
        assert rec['rows'] == [] and rec['seeds'] == []
        assert rec['answer_scores'] == runs['recall'][method]['answer_scores']
    lines = (tmp_path / 'answer' / 'results.csv').read_text().splitlines()
    assert len(lines) == 1 + 3 and 'answer_prob' in lines[0] and 'seed' not in lines[0].split(',')
    assert (tmp_path / 'answer' / 'answer.png').stat().st_size > 5000
