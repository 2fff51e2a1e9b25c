"""
Sample from GPT-2, with or without the persistent memory.

    python sample.py config/type_3.py [--key=value ...]

The config keys are those of the reference code's sample.py (same names, same meaning),
plus a few of ours (seeds, out_jsonl, search, bookkeeping_token). All samples of a run are
one batch: sample i uses seeds[i] through its own torch.Generator, so it is exactly what a
run with --seeds=[seeds[i]] gives.
"""

import sys
from dataclasses import asdict

import run_config
from configurator import answer_help, configure, run_cli
from run_config import RUN_DEFAULTS

DEFAULTS = dict(
    RUN_DEFAULTS,          # a run's keys: model, prompt, seeds, sampling, the memory (see run_config.py)
    unadulterated_gpt=False,  # also generate the plain model's continuation with the same seed, printed first
    out_jsonl='',          # append one JSON object per continuation to this file
)
if __name__ == '__main__':  # --help answers here, before torch and FAISS are imported (seconds)
    answer_help(DEFAULTS, __doc__, [__file__, run_config])

import torch
from tqdm import tqdm

from run import Sampling, append_jsonl, continuations, prepare_run, readout_of, seeds_of
from store import check_outside_memories


def main(argv):
    config = configure(DEFAULTS, argv, __doc__, [sys.modules[__name__], run_config])
    if config['out_jsonl']:
        check_outside_memories(config['out_jsonl'], 'out_jsonl')
    seeds = seeds_of(config)
    sampling = Sampling.from_config(config)
    readout = readout_of(config)
    r = prepare_run(config)
    model, enc, memory, retrieval, start, ids = r.model, r.enc, r.memory, r.retrieval, r.start, r.ids
    runs = ([('plain', None)] if config['unadulterated_gpt'] or memory is None else []) + \
           ([('memory', retrieval)] if memory is not None else [])
    outputs = {}
    desc = 'generating ' + ' + '.join(kind for kind, _ in runs)  # the bar counts the tokens of every run
    with torch.no_grad(), tqdm(total=sampling.max_new_tokens * len(runs), desc=desc, unit='tok',
                               file=sys.stderr, leave=False) as bar:
        for kind, layers in runs:
            outputs[kind] = continuations(model, ids, seeds, sampling, layers, progress=bar, readout=readout)
    plain_name = 'GPT-2' if model.config.arch == 'gpt2' else model.name
    # the reference's label for the plain model's text; read through an exit or a contrast, it is not unadulterated
    plain_label = f'Unadulterated {plain_name} Generated Text' if readout is None else \
        f'{plain_name} without the memory, {readout.describe()}'
    # what produced every record: the model's weights, the sampling and, for the method, the memory
    produced_by = dict(model=dict(init_from=config['init_from'], name=model.name, arch=model.config.arch,
                                  fingerprint=model.fingerprint(), dtype=config['dtype']),
                       device=config['device'], sampling=asdict(sampling),
                       readout=asdict(readout) if readout else None)
    method = dict(memory=memory.describe(config['mem_store'] if config['load_mem_store'] else None),
                  retrieval=r.settings.as_dict(), search=r.search.backend(config['device']),
                  knn_index=r.search.index_for(memory.knn_index), index_params=r.search.params(),
                  # per layer, the index as it searched: its FAISS factory and (calibrated) parameters
                  searched_with={str(i): lm.index.describe() for i, lm in retrieval.items()}) \
        if memory is not None else None
    records = []
    for i, seed in enumerate(seeds):
        print(f"\nseed: {seed}\n")
        for kind in outputs:
            tokens = outputs[kind][i]
            text = enc.decode(tokens)
            label = config['method_text'] if kind == 'memory' else plain_label
            # the reference's sample.py heads a run without memory with method_text ('No Memory')
            print(f"{label if memory is not None else config['method_text']}\n-----")
            print(start + text)
            print('\n------------------\n' if kind == 'plain' and memory is not None else '_' * 60)
            records.append(dict(seed=seed, kind=kind, label=label, prompt=start, text=text, tokens=tokens,
                                **produced_by, method=method if kind == 'memory' else None))
    if config['out_jsonl']:
        append_jsonl(config['out_jsonl'], records)


if __name__ == '__main__':
    run_cli(main)
