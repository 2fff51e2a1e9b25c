"""
Sample from GPT-2, with or without the persistent memory.

    python sample.py config/type_3.py [--key=value ...]

The config keys are those of the reference code's sample.py (same names, same meaning),
plus a few of ours (seeds, out_jsonl, search, bookkeeping_token). All samples of a run are
one batch: sample i uses seeds[i] through its own torch.Generator, so it is exactly what a
run with --seeds=[seeds[i]] gives.
"""

import sys

import torch
from tqdm import tqdm

from configurator import configure, run_cli
from memory import RetrievalSettings, check_search
from run import RUN_DEFAULTS, Sampling, append_jsonl, continuations, load_model, prepare_memory, prompt_ids, seeds_of

DEFAULTS = dict(
    RUN_DEFAULTS,          # a run's keys: model, prompt, seeds, sampling, the memory (see run.py)
    unadulterated_gpt=False,  # also generate the plain model's continuation with the same seed, printed first
    out_jsonl='',          # append one JSON object per continuation to this file
)


def main(argv):
    config = configure(DEFAULTS, argv)
    seeds = seeds_of(config)
    sampling = Sampling.from_config(config)
    check_search(config['search'])
    model, enc = load_model(config)
    settings = RetrievalSettings.from_config(config, model.config.n_layer)
    memory = prepare_memory(config, model, enc, settings)
    retrieval = memory.retrieving_layers(settings, config['device'], config['search']) if memory else None
    start, ids = prompt_ids(config['start'], enc, model.config.block_size)
    runs = ([('unadulterated', None)] if config['unadulterated_gpt'] or memory is None else []) + \
           ([('memory', retrieval)] if memory is not None else [])
    outputs = {}
    with torch.no_grad(), tqdm(total=sampling.max_new_tokens * len(runs), desc='generating', unit='tok',
                               file=sys.stderr, leave=False) as bar:
        for kind, layers in runs:
            outputs[kind] = continuations(model, ids, seeds, sampling, layers, progress=bar)
    records = []
    for i, seed in enumerate(seeds):
        print(f"\nseed: {seed}\n")
        for kind in outputs:
            tokens = outputs[kind][i]
            text = enc.decode(tokens)
            plain = 'GPT-2' if model.config.arch == 'gpt2' else model.name
            label = f'Unadulterated {plain} Generated Text' if kind == 'unadulterated' and memory is not None \
                else config['method_text']
            print(f"{label}\n-----")
            print(start + text)
            print('\n------------------\n' if kind == 'unadulterated' and memory is not None else '_' * 60)
            records.append(dict(seed=seed, kind=kind, prompt=start, text=text, tokens=tokens,
                                method_text=config['method_text'], init_from=config['init_from'],
                                settings=settings.as_dict()))
    if config['out_jsonl']:
        append_jsonl(config['out_jsonl'], records)


if __name__ == '__main__':
    run_cli(main)
