"""
What the memory retrieved, step by step: the write-up's Tables 2 and 3 for any config.

    python retrieval_trace.py config/type_2.py --steps=3
    python retrieval_trace.py config/smollm2_type_3.py --steps=2 --seeds=[1337]

Generates the first seed's continuation of the config's prompt with its memory and, for each
of the first `steps` generated tokens and each memory layer, lists every selected token-head
(docs/method.md section 2, step 1): its query head, context position and token, the selecting
attention weight, the stored rows found (row, stored token, squared L2 distance) and their
weights from step 4, the token's own candidate weight (Types 1 and 3), and the size of the
value change |v' - v|. Step t is the pass that chose generated token t (step 0: the prompt).
trace.csv also names each stored row's document and its position there (build_memory.py
records the documents of a memory built from a folder).
Then, per layer, how many token-heads were selected and which stored tokens were retrieved
most (Table 3). Writes trace.csv (one row per token-head and stored row found) to out_dir.
The numbers are those the model used: LayerMemory records them while it computes.
"""

import os
import sys
from collections import Counter

import run_config
from configurator import UserError, answer_help, configure, run_cli
from run_config import RUN_DEFAULTS

DEFAULTS = dict(
    RUN_DEFAULTS,          # the model, prompt, memory and sampling keys of sample.py (see run_config.py)
    steps=3,               # generated tokens to trace (step 0 is the prompt's pass, which picks the first)
    show=12,               # token-heads printed per layer and step (all go to trace.csv)
    out_dir='out/trace',   # where trace.csv goes
)
if __name__ == '__main__':  # --help answers here, before torch and FAISS are imported (seconds)
    answer_help(DEFAULTS, __doc__, [__file__, run_config])

import torch

from decoding import Decoder, sample_next
from files import write_whole
from report import csv_text
from run import Sampling, prepare_run, seeds_of
from store import check_outside_memories

COLUMNS = ['step', 'next_token', 'layer', 'head', 'kv_head', 'position', 'token', 'attention', 'own_weight',
           'value_change', 'rank', 'row', 'stored_token', 'document', 'doc_position', 'distance', 'weight',
           'similarity', 'memory_share']


def layer_records(lm, layer, step, next_token, tokens, stored, origins, decode):
    """One record per (selected token-head, stored row found) of one layer at one step."""
    ret = lm.last_retrieval
    if ret is None:
        return []
    own = not lm.settings.resid_only
    group = lm.group
    records = []
    for n in range(ret.b.numel()):
        if int(ret.b[n]) != 0:
            continue  # one sequence is traced
        h, j = int(ret.h[n]), int(ret.j[n])
        w = ret.weights[n].tolist()
        base = dict(step=step, next_token=next_token, layer=layer, head=h, kv_head=h // group, position=j,
                    token=decode([tokens[j]]), attention=float(ret.attention[n]),
                    own_weight=w[0] if own else None, value_change=float(ret.value_change[n]))
        for rank, (row, dist) in enumerate(zip(ret.neighbours[n].tolist(), ret.distances[n].tolist())):
            if row < 0:
                continue
            records.append(dict(base, rank=rank + 1, row=row,
                                stored_token=decode([stored[row]]) if stored is not None else None,
                                document=origins[row][0], doc_position=origins[row][1],
                                distance=dist, weight=w[rank + own]))
    return records


def attention_records(lm, layer, step, next_token, tokens, stored, origins, decode):
    """Retrieval attention (memory_mode='attention'): for the newest position's query in every
    head, the stored rows it retrieved, their cosine similarity and the attention weight each
    received, and the share of that position's attention that went to the memory."""
    ret = lm.last_retrieval
    group = ret.rows.size(1) // lm.keys.size(0)
    j = len(tokens) - 1
    records = []
    for h in range(ret.rows.size(1)):
        base = dict(step=step, next_token=next_token, layer=layer, head=h, kv_head=h // group, position=j,
                    token=decode([tokens[j]]), memory_share=float(ret.memory_share[0, h, -1]))
        for rank, (row, sim, w) in enumerate(zip(ret.rows[0, h, -1].tolist(), ret.similarity[0, h, -1].tolist(),
                                                 ret.weights[0, h, -1].tolist())):
            if row >= 0 and sim == sim:  # found, and above the threshold (NaN below it)
                records.append(dict(base, rank=rank + 1, row=row, similarity=sim, weight=w,
                                    stored_token=decode([stored[row]]) if stored is not None else None,
                                    document=origins[row][0], doc_position=origins[row][1]))
    return records


def trace(r, config, seed):
    """Decode `steps` tokens of seed's continuation with the memory, collecting the records."""
    model, retrieval = r.model, r.retrieval
    sampling = Sampling.from_config(config)
    stored, origins = r.memory.stored_token_ids(), r.memory.row_origins()
    x = torch.tensor([r.ids], device=next(model.parameters()).device)
    gen = [torch.Generator().manual_seed(seed)]
    records, selected = [], []
    model.attach_memory(retrieval)
    try:
        with torch.no_grad():
            dec = Decoder(model, sampling.decoding, capacity=x.size(1) + config['steps'])
            logits = dec.prefill(x)
            for step in range(config['steps']):
                tokens = dec.tokens[0].tolist()
                nxt = sample_next(logits, sampling.temperature, sampling.top_k, gen)
                word = r.enc.decode(nxt[0].tolist())
                for layer in sorted(retrieval):
                    lm = retrieval[layer]
                    if getattr(lm, 'reads', 'values') == 'attention':  # every head's newest query retrieves
                        selected.append((step, layer, lm.last_retrieval.rows.size(1)))
                        records += attention_records(lm, layer, step, word, tokens, stored, origins, r.enc.decode)
                        continue
                    selected.append((step, layer, int(lm.last_selection[0].sum())))
                    records += layer_records(lm, layer, step, word, tokens, stored, origins, r.enc.decode)
                if step < config['steps'] - 1:
                    logits = dec.step(nxt.to(x.device))
    finally:
        model.attach_memory(None)
    return records, selected


def print_trace(records, selected, show, out=None):
    """Table 2's form: per step and layer, the selected token-heads and what each retrieved."""
    out = out or sys.stdout
    for step, layer, n_sel in selected:
        recs = [rec for rec in records if rec['step'] == step and rec['layer'] == layer]
        heads = list(dict.fromkeys((rec['head'], rec['position']) for rec in recs))
        word = recs[0]['next_token'] if recs else None
        attention = bool(recs) and recs[0].get('similarity') is not None
        print(f"\nstep {step}" + (f" -> next token {word!r}" if word is not None else '') + f", layer {layer}: " +
              (f"the newest query of each of {n_sel} heads retrieves (memory: its share of the attention)" if attention
               else f"{n_sel} token-heads selected"), file=out)
        if not heads:
            continue
        if attention:  # retrieval attention
            print(f"  {'head':>4} {'pos':>4} {'token':<12} {'memory':>6}  found: row 'stored token' cosine weight", file=out)
            for h, j in heads[:show]:
                mine = [rec for rec in recs if (rec['head'], rec['position']) == (h, j)]
                found = '  '.join(f"#{rec['row']} {rec['stored_token']!r} {rec['similarity']:.2f} {rec['weight']:.3f}"
                                  for rec in mine)
                print(f"  {h:>4} {j:>4} {mine[0]['token']!r:<12.12} {mine[0]['memory_share']:>6.3f}  {found}", file=out)
            continue
        change = "|v'-v|"
        print(f"  {'head':>4} {'pos':>4} {'token':<12} {'att':>6} {'own w':>6} {change:>7}  found: row 'stored token' d² w",
              file=out)
        for h, j in heads[:show]:
            mine = [rec for rec in recs if (rec['head'], rec['position']) == (h, j)]
            first = mine[0]
            own = f"{first['own_weight']:.3f}" if first['own_weight'] is not None else '-'
            found = '  '.join(f"#{rec['row']} {rec['stored_token']!r} {rec['distance']:.1f} {rec['weight']:.3f}"
                              for rec in mine)
            print(f"  {h:>4} {j:>4} {first['token']!r:<12.12} {first['attention']:>6.3f} {own:>6} "
                  f"{first['value_change']:>7.2f}  {found}", file=out)
        if len(heads) > show:
            print(f"  ... {len(heads) - show} more token-heads in trace.csv", file=out)


def print_summary(records, selected, out=None):
    """Table 3's form: per layer, selections per step and the stored tokens retrieved most."""
    out = out or sys.stdout
    print("\nper layer:", file=out)
    for layer in sorted({s[1] for s in selected}):
        counts = [n for _, lay, n in selected if lay == layer]
        recs = [rec for rec in records if rec['layer'] == layer]
        by_count = Counter(rec['stored_token'] for rec in recs)
        by_weight = Counter()
        for rec in recs:
            by_weight[rec['stored_token']] += rec['weight']
        print(f"  layer {layer}: {sum(counts) / len(counts):.1f} token-heads selected per step "
              f"({min(counts)}-{max(counts)}); {len(recs)} rows retrieved", file=out)
        if recs:
            print("    most retrieved: " + ', '.join(f"{t!r} x{c}" for t, c in by_count.most_common(8)), file=out)
            print("    most weight:    " + ', '.join(f"{t!r} {w:.2f}" for t, w in by_weight.most_common(8)), file=out)


def main(argv):
    config = configure(DEFAULTS, argv, __doc__, [sys.modules[__name__], run_config])
    check_outside_memories(config['out_dir'], 'out_dir')
    for key, top in (('steps', 10_000), ('show', 10_000)):
        if not 1 <= config[key] <= top:
            raise UserError(f"{key}={config[key]} must be 1 to {top}")
    if config['steps'] < 1:
        raise UserError(f"steps={config['steps']} must be >= 1")
    r = prepare_run(config, progress=False)
    if r.retrieval is None:
        raise UserError("the config has no memory layer: set knn_num (k > 0 at some layer) and memory=...")
    seed = seeds_of(config)[0]
    records, selected = trace(r, config, seed)
    print(f"prompt: {r.start!r}, seed {seed}, model {r.model.name}, memory layers {sorted(r.retrieval)}, "
          f"{r.memory.num_entries()} stored tokens, {config['decoding']} decoding")
    print_trace(records, selected, config['show'])
    print_summary(records, selected)
    os.makedirs(config['out_dir'], exist_ok=True)
    path = os.path.join(config['out_dir'], 'trace.csv')
    write_whole(path, csv_text(COLUMNS, records))
    print(f"wrote {path} ({len(records)} rows)")


if __name__ == '__main__':
    run_cli(main)
