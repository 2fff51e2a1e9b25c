"""
Attention maps with and without the memory, as labelled heatmaps and as arrays.

    python attention_maps.py config/type_3.py                          # the memory layers, every head
    python attention_maps.py config/type_2.py --layers=[9,10] --heads=[0,5]

For the config's prompt, the attention weights (softmaxed, causal) of the chosen layers and
heads, from one pass of the plain model and one with the config's memory. A memory layer's
own weights are the plain ones (the memory changes values, not weights); the layers above it
see changed inputs, so their weights move. One PNG per layer and head: plain, memory, and
their difference, the prompt's tokens on both axes (readable for prompts up to ~60 tokens).
The arrays go to attention.safetensors (plain.layer{L} and memory.layer{L}: (H, T, T)) with
the tokens in tokens.json.
"""

import json
import os
import sys

import run_config
from configurator import UserError, answer_help, configure, run_cli
from run_config import RUN_DEFAULTS

DEFAULTS = dict(
    RUN_DEFAULTS,          # the model, prompt and memory keys of sample.py (see run_config.py)
    layers=None,           # layers to draw (0-based); None = the memory layers and the one above each
    heads=None,            # heads to draw; None = all
    out_dir='out/attention',  # where the PNGs, attention.safetensors and tokens.json go
)
if __name__ == '__main__':  # --help answers here, before torch and FAISS are imported (seconds)
    answer_help(DEFAULTS, __doc__, [__file__, run_config])

import torch

from files import write_whole
from report import plot_setup, save_png
from run import plain_and_memory, prepare_run
from store import check_outside_memories


def attention(model, ids, retrieval):
    """{'plain': [per layer (H, T, T)], 'memory': [...]} for the prompt."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    return plain_and_memory(model, lambda: [a[0].float().cpu() for a in model(x, return_att=True)[2]], retrieval)


def heatmap(path, labels, maps, layer, head, title):
    """plain | memory | memory - plain for one layer and head."""
    plt = plot_setup()
    T = len(labels)
    size = max(3.0, 0.16 * T + 1.5)
    panels = [('plain model', maps['plain'])] + ([('with the memory', maps['memory']),
                                                 ('memory - plain', maps['memory'] - maps['plain'])]
                                                if 'memory' in maps else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size + 0.6), squeeze=False, layout='constrained')
    for n, (ax, (name, m)) in enumerate(zip(axes[0], panels)):
        diff = name.startswith('memory -')
        lim = float(m.abs().max()) or 1.0
        im = ax.imshow(m.numpy(), cmap='RdBu_r' if diff else 'viridis', vmin=-lim if diff else 0,
                       vmax=lim if diff else 1, interpolation='nearest')
        ax.set_xticks(range(T), labels, rotation=90, fontsize=max(4, 9 - T // 12))
        ax.set_yticks(range(T), labels if n == 0 else [''] * T, fontsize=max(4, 9 - T // 12))
        ax.set_xlabel('attended position (key)', fontsize=8)
        if n == 0:
            ax.set_ylabel('position (query)', fontsize=8)
        ax.set_title(name, fontsize=9)
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label('change in attention weight' if diff else 'attention weight', fontsize=8)
    fig.suptitle(f"{title}: layer {layer} (0-based), head {head}", fontsize=10)
    save_png(fig, path)
    plt.close(fig)


def main(argv):
    config = configure(DEFAULTS, argv, __doc__, [sys.modules[__name__], run_config])
    check_outside_memories(config['out_dir'], 'out_dir')
    r = prepare_run(config, progress=False)
    n_layer, n_head = r.model.config.n_layer, r.model.config.n_head
    layers = config['layers']
    if layers is None:
        mem = sorted(r.retrieval) if r.retrieval else [0]
        layers = sorted({i for m in mem for i in (m, m + 1) if i < n_layer})
    heads = config['heads'] if config['heads'] is not None else list(range(n_head))
    if not layers or not heads:
        raise UserError(f"layers={layers} / heads={heads}: give at least one of each (or leave them out: the memory "
                        f"layers and the one above each, every head)")
    bad = [l for l in layers if not (isinstance(l, int) and 0 <= l < n_layer)] + \
        [h for h in heads if not (isinstance(h, int) and 0 <= h < n_head)]
    if bad:
        raise UserError(f"layers={layers} / heads={heads}: {bad} out of range; the model has layers 0..{n_layer - 1} "
                        f"and heads 0..{n_head - 1}")
    with torch.no_grad():
        maps = attention(r.model, r.ids, r.retrieval)
    labels = [r.enc.decode([t]).replace('\n', '\\n') for t in r.ids]
    out = config['out_dir']
    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save
    write_whole(os.path.join(out, 'attention.safetensors'),
                save({f"{v}.layer{l}": maps[v][l].contiguous() for v in maps for l in layers}))
    write_whole(os.path.join(out, 'tokens.json'), json.dumps(dict(prompt=r.start, tokens=labels, ids=r.ids,
                                                                   layers=layers, heads=heads)))
    title = f"{r.model.name}, prompt {r.start[-30:]!r}"
    paths = []
    for l in layers:
        for h in heads:
            path = os.path.join(out, f"layer{l}_head{h}.png")
            heatmap(path, labels, {v: maps[v][l][h] for v in maps}, l, h, title)
            paths.append(path)
    for l in layers:
        if 'memory' in maps:
            change = (maps['memory'][l] - maps['plain'][l]).abs().max().item()
            print(f"layer {l}: largest change of an attention weight with the memory {change:.3g}")
    print(f"wrote {len(paths)} heatmaps ({paths[0]} ...), attention.safetensors and tokens.json in {out}")


if __name__ == '__main__':
    run_cli(main)
