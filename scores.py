"""
Scores of continuations, as the write-up measures them, and text quality beside them. Pure
functions (perplexities runs the model, nothing else), for sweep.py and anyone analysing
results.

  vader_scores    VADER compound, pos, neu, neg of a continuation (the prompt excluded)
  afinn_score     a second, independent judge: the AFINN-165 lexicon's sum over the words
  copy_rate       the share of a continuation's content words that occur in the memory text
  recall_answer   which answer a continuation starts with
  distinct_n      unique n-grams / all n-grams of a continuation's tokens
  perplexities    of continuations under the plain model, batched
  score_rows      all of the above for one setting's continuations
  summarize       median, IQR and mean per score; fraction positive or successes
"""

import math
import re

import numpy as np
import torch
from torch.nn import functional as F

VADER_SCORES = ['compound', 'pos', 'neu', 'neg']
JUDGE_SCORES = ['afinn', 'copy_rate']  # the second judge and the copy rate (absent from older sweeps' rows)
QUALITY_SCORES = ['distinct_1', 'distinct_2', 'distinct_3', 'perplexity']
POSITIVE_THRESHOLD = 0.05  # VADER's convention: compound >= 0.05 is positive

_vader = None


def vader_scores(text):
    """VADER's compound, pos, neu, neg of a text (the continuation alone, prompt excluded)."""
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _vader = SentimentIntensityAnalyzer()
    s = _vader.polarity_scores(text)
    return {k: s[k] for k in VADER_SCORES}


def afinn_score(text):
    """The AFINN-165 word list's sum of valences (-5..5 per word) over the text: a judge built
    apart from VADER (its own lexicon, no rules for negation, boosters or punctuation), so that
    the two agreeing says more than either alone. > 0 is positive."""
    global _afinn
    if _afinn is None:
        from afinn import Afinn
        _afinn = Afinn(language='en')
    return float(_afinn.score(text))


_afinn = None
# function words: not counted as content when measuring how much of a continuation is copied
STOPWORDS = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being am it
its it's this that these those i you he she we they me him her us them my your his our their not no nor so do does did
done have has had having will would can could should may might must shall than then there here what which who whom
whose when where why how all any each every more most some such only own same too very just also into over under
again about up down out off one two there's i'm don't that's he's she's they're we're you're""".split())


def content_words(text):
    """The text's words (lower case, letters and apostrophes) that are not function words."""
    return [w for w in re.findall(r"[a-z][a-z']*", text.casefold()) if w not in STOPWORDS]


def copy_rate(text, memory_words):
    """The share of the continuation's content words that occur in the memory text (its
    content_words as a set): high when steering is parroting. NaN with no content words."""
    words = content_words(text)
    return sum(w in memory_words for w in words) / len(words) if words else float('nan')


def recall_answer(text, answers):
    """The answer the continuation starts with, or None.

    Leading whitespace of the continuation is skipped; the comparison ignores case; the
    answer must end at a word boundary (the next character, if any, is not a letter, a
    digit or '_'): "Vancouver." and "Vancouver's" count, "Vancouverite" does not.
    Answers are stripped of surrounding whitespace; the longest matching answer is given.
    """
    t = text.lstrip().casefold()
    for a in sorted((a.strip() for a in answers), key=len, reverse=True):
        a_cf = a.casefold()
        if a_cf and t.startswith(a_cf):
            nxt = t[len(a_cf):len(a_cf) + 1]
            if not nxt or not (nxt.isalnum() or nxt == '_'):
                return a
    return None


def distinct_n(tokens, n):
    """Unique n-grams / all n-grams of one continuation's token ids; NaN if it has none."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float('nan')


@torch.no_grad()
def perplexities(model, prompt, continuations, max_logit_floats=1 << 26):
    """exp(mean NLL) of each continuation's tokens under the plain model (any memory attached
    is not used), given the prompt and the continuation's preceding tokens. Batched; rows whose logits
    would exceed max_logit_floats go in several chunks. Sequences longer than block_size
    keep their last block_size tokens (the prompt is cut first)."""
    device = next(model.parameters()).device
    block, V = model.config.block_size, model.config.vocab_size
    out = [float('nan')] * len(continuations)
    by_len = {}
    for i, c in enumerate(continuations):
        by_len.setdefault(len(c), []).append(i)
    for n, rows in by_len.items():
        if n == 0:
            continue
        seqs = [(prompt + continuations[i])[-block:] for i in rows]
        L = len(seqs[0])
        first = max(L - n, 1)  # first scored position (it needs one token before it)
        per_chunk = max(1, max_logit_floats // (L * V))
        for c0 in range(0, len(rows), per_chunk):
            x = torch.tensor(seqs[c0:c0 + per_chunk], dtype=torch.long, device=device)
            logits, _, _ = model(x, use_memory=False, all_logits=True)
            logp = F.log_softmax(logits[:, first - 1:L - 1].float(), dim=-1)
            nll = -logp.gather(-1, x[:, first:, None]).squeeze(-1).mean(dim=1)
            for r, v in zip(rows[c0:c0 + per_chunk], torch.exp(nll).tolist()):
                out[r] = v
    return out


def score_rows(metric, answers, texts, tokens, ppl, memory=''):
    """Every continuation's scores: VADER's and AFINN's sentiment and the copy rate from
    `memory` (vader), or the answer it starts with (recall), with distinct-n and perplexity."""
    rows = []
    memory_words = set(content_words(memory))
    for text, toks, p in zip(texts, tokens, ppl):
        s = {}
        if metric == 'vader':
            s.update(vader_scores(text))
            s['positive'] = int(s['compound'] >= POSITIVE_THRESHOLD)
            s['afinn'] = afinn_score(text)
            s['copy_rate'] = copy_rate(text, memory_words)
        else:
            a = recall_answer(text, answers)
            s['success'] = int(a is not None)
            s['answer'] = a or ''
        for n in (1, 2, 3):
            s[f'distinct_{n}'] = distinct_n(toks, n)
        s['perplexity'] = p
        rows.append(s)
    return rows


def wilson_interval(k, n, z=1.96):
    """The Wilson score interval (95% by default) of a proportion k/n, as fractions (lo, hi):
    unlike k/n +- z*se it stays inside [0, 1] and is not empty at k = 0 or k = n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(metric, rows):
    """Per-setting summary: median, IQR (75th - 25th percentile, numpy's linear
    interpolation) and mean of each score; fraction positive (VADER) or successes (recall)."""
    out = dict(seeds=len(rows))
    if metric == 'answer':  # teacher-forced only: no continuations
        return out
    cols = (VADER_SCORES + [c for c in JUDGE_SCORES if rows and c in rows[0]['scores']] if metric == 'vader' else []) \
        + QUALITY_SCORES
    for c in cols:
        vals = np.array([r['scores'][c] for r in rows], dtype=float)
        vals = vals[~np.isnan(vals)]
        if len(vals):
            q25, med, q75 = np.percentile(vals, [25, 50, 75])
            out.update({f'{c}_median': float(med), f'{c}_iqr': float(q75 - q25), f'{c}_mean': float(vals.mean()),
                        f'{c}_q25': float(q25), f'{c}_q75': float(q75)})
        else:
            out.update({f'{c}_{k}': float('nan') for k in ('median', 'iqr', 'mean', 'q25', 'q75')})
    if metric == 'vader':
        out['frac_positive'] = sum(r['scores']['positive'] for r in rows) / len(rows) if rows else float('nan')
    else:
        out['successes'] = sum(r['scores']['success'] for r in rows)
    return out
