"""
Benchmark: one sweep setting, all seeds as one batch against the same seeds one by one.

    python bench_sweep.py [--seeds=32] [--max_new_tokens=100] [--device=cpu] [--decoding=exact]

The setting is Table 1's (Type 3: k 5 at layers 6, 7, 8, BF 0.9, MF 5, TS 0.01, r 0.33,
temperature 0.8, top_k 200) on a GPT-2-small-shaped model (12 layers, 12 heads, 768 wide,
vocab 50257, block 1024) with random weights (normal(0, 0.02), as GPT-2 was initialised), so
nothing is downloaded; its query weights are scaled by `sharpen` so attention is peaked, as
in a trained model, rather than uniform (uniform attention would select nearly every
token-head for retrieval at MF 5); the fraction selected is printed. Its memory is data/cats.txt, tokenized with the tiny test checkpoint's
474-token BPE (its ids are valid GPT-2 ids; no GPT-2 vocabulary is available offline).
Prints both times, the ratio, and whether the outputs are identical.
"""

import os
import sys
import time

import torch

from configurator import configure, run_cli
from memory import Memory
from model import GPT, GPTConfig, UserError, encode, load_tokenizer
from sample import DEFAULTS as SAMPLE_DEFAULTS
from sample import generate, read_text_file

ROOT = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(ROOT, 'tests', 'reference', 'tiny-gpt2')
ISSUE = dict(seeds=32, max_new_tokens=100)  # what the benchmark is specified with

DEFAULTS = dict(
    seeds=32,              # seeds 1337, 1338, ...: one setting's batch
    max_new_tokens=100,
    device='cpu',
    decoding='exact',      # sample.py's decoding mode (where it has one)
    weights_seed=0,        # torch seed of the random weights
    sharpen=20.0,          # query weights x this, so attention is peaked like a trained model's (1 = uniform)
    threads=0,             # torch.set_num_threads; 0 = torch's default
)
TABLE1 = dict(knn_num=[0, 0, 0, 0, 0, 0, 5, 5, 5, 0, 0, 0], mem_frac=5.0, bookkeeping_frac=0.9,
              knn_softmax_influence=0.01, resid_only=False, resid_frac=0.33)


def random_gpt2_small(seed, device, sharpen=1.0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('.weight') and p.dim() == 2:
                torch.nn.init.normal_(p, 0.0, 0.02)
            elif 'ln' in name and name.endswith('.weight'):
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.zeros_(p)
        for block in model.transformer.h:  # nn.Linear weight is (3C, C): its first C rows make q
            block.attn.c_attn.weight[:model.config.n_embd] *= sharpen
    model.name = f'random-gpt2-small-shape-seed{seed}'
    return model.to(device).eval()


def main(argv):
    config = configure(DEFAULTS, argv)
    if config['threads']:
        torch.set_num_threads(config['threads'])
    if config['seeds'] < 1 or config['max_new_tokens'] < 1:
        raise UserError("seeds and max_new_tokens must be >= 1")
    if config['device'].startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device={config['device']} but CUDA is not available here")
    model = random_gpt2_small(config['weights_seed'], config['device'], config['sharpen'])
    enc = load_tokenizer(TOKENIZER)
    text = read_text_file(os.path.join(ROOT, 'data', 'cats.txt'), 'memory')
    memory = Memory.build(model, enc, text, layers=[6, 7, 8], add_bookkeeping_token=True)
    search = None if config['device'] == 'cpu' else 'torch'
    memory.use(**TABLE1, device=config['device'], search=search)
    ids = encode(enc, '\nCats are horrible')
    seeds = [1337 + i for i in range(config['seeds'])]
    gen_config = dict(SAMPLE_DEFAULTS, **TABLE1, max_new_tokens=config['max_new_tokens'], temperature=0.8, top_k=200)
    if 'decoding' in SAMPLE_DEFAULTS:
        gen_config['decoding'] = config['decoding']
    elif config['decoding'] != 'exact':
        raise UserError("this sample.py has no decoding modes; use --decoding=exact")

    reduced = {k: config[k] for k in ISSUE if config[k] != ISSUE[k]}
    print(f"device {config['device']}" + (f" ({torch.cuda.get_device_name()})" if config['device'] != 'cpu' else
                                         f", {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"))
    print(f"model: GPT-2-small shape, random weights (queries x {config['sharpen']:g}); memory: {memory.num_entries()} tokens at layers 6,7,8; "
          f"prompt {len(ids)} tokens; Table 1 Type 3 settings; decoding {gen_config.get('decoding', 'exact')}")
    print(f"{len(seeds)} seeds x {config['max_new_tokens']} new tokens"
          + (f"  (REDUCED from the specified {ISSUE['seeds']} seeds x {ISSUE['max_new_tokens']} tokens: {reduced})"
             if reduced else ''))
    sys.stdout.flush()

    def sync():
        if config['device'].startswith('cuda'):
            torch.cuda.synchronize()

    with torch.no_grad():
        generate(model, ids, seeds[:2], dict(gen_config, max_new_tokens=2), memory)  # warm-up
        sync()
        t0 = time.perf_counter()
        batched = generate(model, ids, seeds, gen_config, memory)
        sync()
        t_batch = time.perf_counter() - t0
        print(f"batched:    {t_batch:8.1f} s  (one batch of {len(seeds)})")
        sys.stdout.flush()
        t0 = time.perf_counter()
        single = []
        for s in seeds:
            single += generate(model, ids, [s], gen_config, memory)
        sync()
        t_single = time.perf_counter() - t0
        print(f"one by one: {t_single:8.1f} s  ({len(seeds)} runs of 1)")
    sel = [lm.last_selection for lm in memory.layers.values() if getattr(lm, 'last_selection', None) is not None]
    identical = batched == single
    same_rows = sum(a == b for a, b in zip(batched, single))
    print(f"speed-up:   {t_single / t_batch:8.2f} x")
    print(f"outputs identical: {'yes' if identical else 'NO'} ({same_rows}/{len(seeds)} seeds equal)")
    if sel:
        frac = sum(x.float().mean().item() for x in sel) / len(sel)
        print(f"(last step of the last run: {100 * frac:.0f}% of the memory layers' tokens-heads looked up the memory)")
    if not identical:
        sys.exit(1)


if __name__ == '__main__':
    run_cli(main)
