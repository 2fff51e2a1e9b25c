"""
Sample from GPT-2, with or without the persistent memory.

    python sample.py config/type_3.py [--key=value ...]

The config keys are those of the reference code's sample.py (same names, same meaning),
plus a few of ours (seeds, out_jsonl, search, bookkeeping_token). All samples of a run are
one batch: sample i uses seeds[i] through its own torch.Generator, so it is exactly what a
run with --seeds=[seeds[i]] gives.
"""

import json
import os
import sys
import warnings

import torch

from configurator import configure, run_cli
from memory import Memory
from model import GPT, UserError, encode

DEFAULTS = dict(
    init_from='gpt2',      # 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local checkpoint directory
    start='\n',            # the prompt, or "FILE:prompt.txt"
    num_samples=3,         # number of samples to draw (when seeds is not given)
    max_new_tokens=50,     # tokens generated per sample
    temperature=0.8,       # 1.0 = no change, < 1.0 = less random
    top_k=200,             # keep only the top_k most likely tokens
    seed=1337,             # sample i uses seed + i, unless seeds is given
    seeds=None,            # a list of seeds, one sample each, or a count n (seed, ..., seed+n-1); overrides num_samples
    device='cpu',          # 'cpu', 'cuda', 'cuda:1', ...
    dtype='float32',       # 'float32', 'bfloat16' or 'float16'
    compile=False,         # accepted for the reference's configs; has no effect here
    out_dir='out',         # accepted for the reference's configs; has no effect here
    # --- the memory (METHOD.md) ---
    knn_num=None,          # k per layer, one entry per layer (0 = no memory in that layer); None = all 0
    memory='',             # the memory text, tokenized as given (starts with its bookkeeping token), or "FILE:path"
    bookkeeping_token='\n',  # put in front of a memory read from a file
    remove_bookkeeping_token_mem_size=None,  # leading memory tokens not stored; None = the bookkeeping token's length
    mem_store='',          # a saved memory directory (ours, or the reference's layout)
    load_mem_store=False,  # load the memory from mem_store instead of building it from `memory`
    store_mem=False,       # save the memory built from `memory` to mem_store
    mem_frac=0.0,          # MF: tokens whose last-row attention is >= 1/(MF*T) look up the memory; 0 = token 0 only
    bookkeeping_frac=0.0,  # BF: token 0 looks up the memory only if its attention is > BF
    knn_softmax_influence=1.0,  # TS: scales q.key before the softmax over candidates
    resid_only=False,      # True: the token's own key/value is not a candidate
    resid_frac=0.0,        # r: v' = (1-r) m + r v; 0 = v' = m
    decoding='exact',      # 'exact' (the method) or 'cached' (approximate, cost per token independent of context)
    search=None,           # kNN search: 'faiss' or 'torch' (exact, on the model's device); None = faiss on CPU, torch on CUDA
    # --- output ---
    unadulterated_gpt=False,  # also generate the plain model's continuation with the same seed, printed first
    method_text='No Memory',  # label printed above the method's samples
    out_jsonl='',          # append one JSON object per continuation to this file
)


def read_text_file(path, what):
    """A user's text file, read whole: clear errors for missing, non-UTF-8 or empty files.
    One final newline (the one editors add) is dropped."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file {path} does not exist")
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    text = text[:-2] if text.endswith('\r\n') else text[:-1] if text.endswith('\n') else text
    if not text.strip():
        raise UserError(f"{what} file {path} is empty; put some text in it")
    return text


def seeds_of(config):
    seeds = config['seeds']
    if seeds is None:
        if config['num_samples'] < 1:
            raise UserError(f"num_samples={config['num_samples']} must be at least 1")
        return [config['seed'] + i for i in range(config['num_samples'])]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise UserError(f"seeds={seeds} must be a count >= 1 or a list of seeds")
        return [config['seed'] + i for i in range(seeds)]  # a count, as in sweep.py
    if not isinstance(seeds, (list, tuple)) or not seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise UserError(f"seeds={seeds!r} must be a count or a non-empty list of whole numbers >= 0")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds={seeds!r} repeats a seed")
    return list(seeds)


def check_generation(config, where=None):
    """The sampling settings and decoding mode; `where` names the setting in the message."""
    at = f"{where}: " if where else ''
    if config['max_new_tokens'] < 1 or config['temperature'] <= 0 or \
            (config['top_k'] is not None and config['top_k'] < 1):
        raise UserError(f"{at}max_new_tokens and top_k must be >= 1 and temperature > 0")
    if config['decoding'] not in ('exact', 'cached'):
        raise UserError(f"{at}decoding={config['decoding']!r} must be 'exact' or 'cached'")


def load_model(config):
    device = config['device']
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device={device} but CUDA is not available here; use --device=cpu")
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if config['dtype'] not in dtypes:
        raise UserError(f"dtype={config['dtype']!r} must be one of {', '.join(dtypes)}")
    model, enc = GPT.from_pretrained(config['init_from'])
    return model.to(device=device, dtype=dtypes[config['dtype']]), enc


def retrieval_settings(config, n_layer):
    knn_num = config['knn_num'] if config['knn_num'] is not None else [0] * n_layer
    return dict(knn_num=list(knn_num) if isinstance(knn_num, (list, tuple)) else knn_num,
                mem_frac=config['mem_frac'], bookkeeping_frac=config['bookkeeping_frac'],
                knn_softmax_influence=config['knn_softmax_influence'], resid_only=config['resid_only'],
                resid_frac=config['resid_frac'])


def prepare_memory(config, model, enc, progress=True):
    """The memory the config asks for, in use on the model (None when every k is 0)."""
    settings = retrieval_settings(config, model.config.n_layer)
    from memory import check_retrieval_settings
    check_retrieval_settings(n_layer=model.config.n_layer, **settings)
    layers = [i for i, k in enumerate(settings['knn_num']) if k > 0]
    if not layers:
        return None
    if config['load_mem_store']:
        if not config['mem_store']:
            raise UserError("load_mem_store=True needs mem_store=DIR (a memory made by build_memory.py)")
        memory = Memory.load(config['mem_store'], model, enc)
    else:
        text, from_file = config['memory'], False
        if text.startswith('FILE:'):
            text, from_file = read_text_file(text[5:], 'memory'), True
        if not text.strip():
            raise UserError("knn_num turns the memory on but the memory text is empty; set memory=... "
                            "(or memory=FILE:path), or load_mem_store=True with mem_store=DIR")
        memory = Memory.build(model, enc, text, layers=layers, bookkeeping_token=config['bookkeeping_token'],
                              remove_bookkeeping_token_mem_size=config['remove_bookkeeping_token_mem_size'],
                              add_bookkeeping_token=from_file, progress=progress)
        if config['store_mem']:
            if not config['mem_store']:
                raise UserError("store_mem=True needs mem_store=DIR to save the memory to")
            memory.save(config['mem_store'])
    device = next(model.parameters()).device
    return memory.use(**settings, device=device, search=config['search'])


def prompt_ids(config, enc):
    start = config['start']
    if start.startswith('FILE:'):
        start = read_text_file(start[5:], 'prompt')
    ids = encode(enc, start)
    if not ids:
        raise UserError("the prompt is empty; set start=... (GPT-2 needs at least one token)")
    return start, ids


def generate(model, ids, seeds, config, memory, progress=None):
    """Continuations (token id lists) of prompt `ids` for each seed, with `memory` attached
    (None: the plain model). Row i draws with its own generator seeded with seeds[i]."""
    model.attach_memory(memory)
    try:
        device = next(model.parameters()).device
        x = torch.tensor([ids] * len(seeds), dtype=torch.long, device=device)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        y = model.generate(x, config['max_new_tokens'], temperature=config['temperature'],
                           top_k=config['top_k'], generators=gens, progress=progress, mode=config['decoding'])
    finally:
        model.attach_memory(None)
    return [row[len(ids):].tolist() for row in y]


def append_jsonl(path, records):
    """Append records as JSON lines, in one write, so a line is never left half-written."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    data = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
    with open(path, 'a', encoding='utf-8') as f:
        f.write(data)


def main(argv):
    config = configure(DEFAULTS, argv)
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    seeds = seeds_of(config)
    check_generation(config)
    model, enc = load_model(config)
    memory = prepare_memory(config, model, enc)
    start, ids = prompt_ids(config, enc)
    if len(ids) > model.config.block_size:
        # the model sees only the last block_size tokens, as in the reference's generate()
        warnings.warn(f"prompt of {len(ids)} tokens is longer than block_size {model.config.block_size}; "
                      f"only its last {model.config.block_size} tokens are used")
        ids = ids[-model.config.block_size:]
    from tqdm import tqdm
    runs = ([('unadulterated', None)] if config['unadulterated_gpt'] or memory is None else []) + \
           ([('memory', memory)] if memory is not None else [])
    outputs = {}
    with torch.no_grad(), tqdm(total=config['max_new_tokens'] * len(runs), desc='generating', unit='tok',
                               file=sys.stderr, leave=False) as bar:
        for kind, mem in runs:
            outputs[kind] = generate(model, ids, seeds, config, mem, progress=bar)
    records = []
    for i, seed in enumerate(seeds):
        print(f"\nseed: {seed}\n")
        for kind in outputs:
            tokens = outputs[kind][i]
            text = enc.decode(tokens)
            label = 'Unadulterated GPT-2 Generated Text' if kind == 'unadulterated' and memory is not None \
                else config['method_text']
            print(f"{label}\n-----")
            print(start + text)
            print('\n------------------\n' if kind == 'unadulterated' and memory is not None else '_' * 60)
            records.append(dict(seed=seed, kind=kind, prompt=start, text=text, tokens=tokens,
                                method_text=config['method_text'], init_from=config['init_from'],
                                settings=retrieval_settings(config, model.config.n_layer)))
    if config['out_jsonl']:
        append_jsonl(config['out_jsonl'], records)


if __name__ == '__main__':
    run_cli(main)
