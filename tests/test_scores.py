"""scores.py: the recall rule, distinct-n and VADER, perplexity batched against one by one."""
import numpy as np
import torch

import scores
from run import RUN_DEFAULTS, Sampling, continuations


def test_recall_rule():
    a = ['Vancouver']
    assert scores.recall_answer(' Vancouver is', a) == 'Vancouver'
    assert scores.recall_answer('\n\n  vancouver.', a) == 'Vancouver'
    assert scores.recall_answer(" VANCOUVER's", a) == 'Vancouver'
    assert scores.recall_answer(' Vancouver', a) == 'Vancouver'
    assert scores.recall_answer(' Vancouverite', a) is None       # word boundary after the answer
    assert scores.recall_answer(' the city of Vancouver', a) is None  # must start with it
    assert scores.recall_answer(' Toronto', ['Vancouver', ' toronto ']) == 'toronto'
    assert scores.recall_answer(' New York City', ['New York', 'New York City']) == 'New York City'


def test_distinct_and_vader():
    assert scores.distinct_n([1, 2, 1, 2], 1) == 0.5
    assert scores.distinct_n([1, 2, 1, 2], 2) == 2 / 3
    assert scores.distinct_n([1, 2, 1, 2], 3) == 1.0
    assert np.isnan(scores.distinct_n([1], 2))
    s = scores.vader_scores('Cats are absolutely wonderful and lovely.')
    assert set(s) == {'compound', 'pos', 'neu', 'neg'} and s['compound'] > 0.5
    rows = scores.score_rows('vader', None, ['I love it', 'I hate it'], [[1, 2], [3, 4]], [2.0, 3.0])
    assert [r['positive'] for r in rows] == [1, 0]


def test_perplexity_batched_equals_single(tiny):
    model, enc = tiny
    prompt = enc.encode('\nCats are horrible')
    conts = continuations(model, prompt, [1, 2, 3], Sampling.from_config(dict(RUN_DEFAULTS, max_new_tokens=12)))
    batched = scores.perplexities(model, prompt, conts)
    for c, p in zip(conts, batched):
        x = torch.tensor([prompt + c])
        logits, _, _ = model(x, all_logits=True)
        logp = torch.log_softmax(logits[0, :-1].float(), -1)
        nll = -logp[torch.arange(len(prompt) - 1, x.size(1) - 1), x[0, len(prompt):]].mean()
        assert abs(p - torch.exp(nll).item()) < 1e-3 * p
    # small chunks give the same numbers
    assert np.allclose(scores.perplexities(model, prompt, conts, max_logit_floats=1), batched, rtol=1e-5)
