"""
Logit lens, with and without the memory: the next token read out after every block.

    python logit_lens.py config/type_2.py                  # GPT-2: where does "Vancouver" appear?
    python logit_lens.py config/smollm2_type_3.py --top=3

For the config's prompt, exit i's next-token distribution is softmax(head(h_i)), h_i the
residual stream at the last position after the first i blocks (docs/method.md section 6: the
final norm, then the LM head; i = n_layer is the model's output). It is computed for the
plain model and with the config's memory, and shown side by side: the top tokens per exit,
and the KL divergence of the memory's distribution from the plain one, which says where in
depth the memory's effect on the next token appears. Writes lens.csv (every exit, variant
and rank) and lens.png (probability of the tracked tokens per exit, and the KL) to out_dir.
"""

import os
import sys

import run_config
from configurator import UserError, answer_help, configure, run_cli
from run_config import RUN_DEFAULTS

DEFAULTS = dict(
    RUN_DEFAULTS,          # the model, prompt and memory keys of sample.py (see run_config.py)
    top=5,                 # tokens shown per exit and variant
    track=[],              # tokens whose probability is plotted per exit, e.g. [' Vancouver']; [] = the top ones at the output
    out_dir='out/lens',    # where lens.csv and lens.png go
)
if __name__ == '__main__':  # --help answers here, before torch and FAISS are imported (seconds)
    answer_help(DEFAULTS, __doc__, [__file__, run_config])

import torch
import torch.nn.functional as F

from files import write_whole
from report import csv_text, plot_setup, save_png
from run import plain_and_memory, prepare_run
from store import check_outside_memories
from tokenizer import encode


def lens(model, ids, retrieval):
    """{'plain': {i: probs (V,)}, 'memory': ...} for i = 1..n_layer at the prompt's last position."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    return plain_and_memory(model, lambda: {i: F.softmax(logits[0].float(), -1) for i, logits in model.exits(x).items()},
                            retrieval)


def kl(p, q):
    """KL(p || q) in nats."""
    return float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum())


def table(enc, probs, top):
    """The terminal table: per exit, the top tokens of each variant, and KL(memory || plain)."""
    variants = list(probs)
    width = 17 * top
    lines = [f"{'exit':>4}  " + '  '.join(f"{v + ' (top ' + str(top) + ')':<{width}}" for v in variants)
             + ('  KL(mem||plain)' if len(variants) == 2 else '')]
    for i in probs['plain']:
        cells = []
        for v in variants:
            p, idx = probs[v][i].topk(top)
            cells.append(' '.join(f"{enc.decode([t])[:9]!r:<11} {q:.3f}" for q, t in zip(p.tolist(), idx.tolist())))
        lines.append(f"{i:>4}  " + '  '.join(f"{c:<{width}}" for c in cells)
                     + (f"  {kl(probs['memory'][i], probs['plain'][i]):.2e}" if len(variants) == 2 else ''))
    return '\n'.join(lines)


def tracked_tokens(enc, probs, track):
    if track:
        ids = []
        for t in track:
            tok = encode(enc, t)
            if len(tok) != 1:
                raise UserError(f"track={t!r} is {len(tok)} tokens; give single tokens (GPT-2: with their leading space)")
            ids += tok
        return ids
    last = max(probs['plain'])
    return list(dict.fromkeys(int(probs[v][last].argmax()) for v in probs))


def plot(path, enc, probs, tokens, title, memory_layers=()):
    """The tracked tokens' probability per exit (dashed: plain, solid: memory) and the KL per
    exit; the exits right after the memory layers are shaded (memory layer L is block L, read
    first at exit L + 1)."""
    plt = plot_setup()
    variants = list(probs)
    fig, axes = plt.subplots(1 + (len(variants) == 2), 1, figsize=(7, 5.5 if len(variants) == 2 else 3.2), sharex=True,
                             squeeze=False)
    exits = list(probs['plain'])
    ax = axes[0, 0]
    for n, t in enumerate(tokens):
        for v, style in (('plain', '--'), ('memory', '-')):
            if v in probs:
                ax.plot(exits, [float(probs[v][i][t]) for i in exits], style, marker='o', ms=3, color=f"C{n}",
                        label=f"{enc.decode([t])!r} {v}")
    ax.set_ylabel('p(next token)')
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9)
    if len(variants) == 2:
        axes[1, 0].plot(exits, [kl(probs['memory'][i], probs['plain'][i]) for i in exits], 'o-', ms=3, color='tab:blue')
        axes[1, 0].set_ylabel('KL(memory || plain), nats')
    for a in axes[:, 0]:
        for n, layer in enumerate(memory_layers):
            a.axvspan(layer + 0.5, layer + 1.5, color='0.8', alpha=0.5, lw=0,
                      label='after a memory layer' if n == 0 and a is axes[0, 0] else None)
    if memory_layers:
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    axes[-1, 0].set_xlabel('exit i: after the first i blocks (i = n_layer is the output)')
    save_png(fig, path)
    plt.close(fig)


def main(argv):
    config = configure(DEFAULTS, argv, __doc__, [sys.modules[__name__], run_config])
    check_outside_memories(config['out_dir'], 'out_dir')
    if not 1 <= config['top'] <= 100:
        raise UserError(f"top={config['top']} must be 1 to 100 (tokens shown per exit)")
    r = prepare_run(config, progress=False)
    with torch.no_grad():
        probs = lens(r.model, r.ids, r.retrieval)
    print(f"prompt: {r.start!r} ({len(r.ids)} tokens), model {r.model.name}, "
          f"memory layers {sorted(r.retrieval) if r.retrieval else 'none'}")
    print(table(r.enc, probs, config['top']))
    rows = [dict(exit=i, variant=v, rank=k + 1, token=r.enc.decode([t]), token_id=t, prob=q)
            for v in probs for i in probs[v] for k, (q, t) in enumerate(zip(*(x.tolist() for x in probs[v][i].topk(config['top']))))]
    os.makedirs(config['out_dir'], exist_ok=True)
    write_whole(os.path.join(config['out_dir'], 'lens.csv'),
                csv_text(['exit', 'variant', 'rank', 'token', 'token_id', 'prob'], rows))
    tokens = tracked_tokens(r.enc, probs, config['track'])
    plot(os.path.join(config['out_dir'], 'lens.png'), r.enc, probs, tokens,
         f"logit lens: {r.model.name}, prompt {r.start[-40:]!r}", sorted(r.retrieval or ()))
    print(f"wrote {os.path.join(config['out_dir'], 'lens.csv')}, {os.path.join(config['out_dir'], 'lens.png')}")


if __name__ == '__main__':
    run_cli(main)
