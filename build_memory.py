"""
Build a persistent memory from a text file or a folder of them and save it as a directory.

    python build_memory.py data/vancouver.txt --init_from=gpt2 --mem_store=out/vancouver --layers=[9]
    python build_memory.py data/ --init_from=gpt2 --mem_store=out/data --layers=[9]    # one document per .txt file
    python build_memory.py more.txt --mem_store=out/vancouver --append=True           # add to a memory

Each document gets the bookkeeping token in front and is windowed on its own (texts longer
than block_size go in windows, each with its own bookkeeping token); the plain model runs
over the windows in batches (retrieval off), and the keys and values of every head of the
chosen layers are stored (docs/method.md section 1). Rows are spooled to disk as they are made,
so memory use stays at one batch however long the documents are; the directory is written
whole at the end, so an interrupted build leaves it as it was (a memory being appended to
stays readable throughout). The manifest records each document's span of rows.
Use it with: python sample.py ... --load_mem_store=True --mem_store=out/vancouver

    python build_memory.py --reindex=out/vancouver --knn_index=hnsw   # another index, same keys

The index (knn_index) is recorded in the manifest; an approximate one is trained here and
saved in the directory (index-*.safetensors), so loading the memory does not train it again.
sample.py and sweep.py can also search another one (--knn_index, --nprobe, --ef_search).
"""

import os
import sys
import time

from configurator import UserError, answer_help, configure, run_cli

DEFAULTS = dict(
    init_from='gpt2',      # as in sample.py: a GPT-2 name, hub id, checkpoint directory, GGUF file or 'smollm2-135m'
    mem_store='',          # output directory; default out/<text file name>
    layers=None,           # layer indices to store, e.g. [6, 7, 8]; None = all layers
    bookkeeping_token='\n',  # put in front of the text (and of every window)
    remove_bookkeeping_token_mem_size=None,  # leading tokens of each window not stored; None = the bookkeeping token's length
    memory_keys='unrotated',  # RoPE models: keys before RoPE ('unrotated') or as attention sees them ('rotated')
    knn_index='flat',      # the memory's search index: 'flat' (exact), 'hnsw', 'ivf', 'ivfsq', 'ivfpq' or a FAISS factory string
    reindex='',            # a memory directory to give another knn_index, without running the model (no text file)
    store_dtype='float32',  # keys and values saved as 'float32' or 'float16' (half the disk and RAM)
    append=False,          # add the documents to the memory at mem_store (a new version, written whole)
    batch_size=8,          # windows that go through the model together
    device='cpu',          # 'cpu', 'cuda', 'cuda:1', ...
    dtype='float32',       # 'float32', 'bfloat16' or 'float16'
)
if __name__ == '__main__':  # --help answers here, before torch and FAISS are imported (seconds)
    answer_help(DEFAULTS, __doc__, [__file__])

from build import build_documents, read_documents
from knn_index import check_knn_index, index_factory
from run import load_model
from store import load_memory, record_knn_index, save_indexes


def main(argv):
    if '--help' in argv or '-h' in argv:
        configure(DEFAULTS, argv, __doc__, [sys.modules[__name__]])
    texts = [a for a in argv if not a.startswith('--') and not a.endswith('.py')]
    if not texts:
        config = configure(DEFAULTS, argv)
        if config['reindex']:
            return reindex(config)
    if len(texts) != 1:
        raise UserError("give one text file or folder: python build_memory.py FILE_OR_FOLDER [--key=value ...]")
    config = configure(DEFAULTS, [a for a in argv if a not in texts])
    documents = read_documents(texts[0])
    layers = config['layers']
    if layers is not None and (not isinstance(layers, (list, tuple)) or not all(isinstance(l, int) for l in layers)):
        raise UserError(f"layers={layers!r} must be a list of layer indices, e.g. --layers=[9]")
    mem_store = config['mem_store'] or os.path.join('out', os.path.splitext(os.path.basename(os.path.normpath(texts[0])))[0])
    if config['append'] and not os.path.isfile(os.path.join(mem_store, 'memory.json')):
        raise UserError(f"append=True adds to a memory, but {mem_store} holds none; build it first (without --append)")
    model, enc = load_model(config)
    check_knn_index(config['knn_index'], model.config.head_dim)  # a bad index choice fails before the model runs
    t0 = time.time()
    path = build_documents(model, enc, documents, mem_store, layers=layers, bookkeeping_token=config['bookkeeping_token'],
                           n_skip=config['remove_bookkeeping_token_mem_size'], memory_keys=config['memory_keys'],
                           batch_size=config['batch_size'], dtype=config['store_dtype'], knn_index=config['knn_index'],
                           append=config['append'])
    seconds = time.time() - t0
    memory = load_memory(path, model, enc, mmap=True)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    m = memory.meta
    tokens = sum(d['tokens'] for d in m['documents'][-len(documents):])
    print(f"stored {memory.num_entries()} tokens per head from {sum(len(w) for w in m['token_windows'])} tokens "
          f"in {len(m['token_windows'])} window(s) of {len(m['documents'])} document(s)"
          + (f" ({len(documents)} appended)" if config['append'] else f" of {texts[0]}"))
    print(f"model {m['model']['name']} (weights {m['model']['fingerprint']}), layers {memory.stored_layers}, "
          f"{memory.keys[memory.stored_layers[0]].size(0)} key/value heads (of {m['model']['n_head']} query heads) of size "
          f"{m['model']['head_size']}; {tokens / max(seconds, 1e-9):.0f} tokens/s")
    print(f"{size / 1e6:.2f} MB on disk at {path} (keys and values in {str(memory.values[memory.stored_layers[0]].dtype).removeprefix('torch.')})")
    save_index(memory, path)


def save_index(memory, path):
    """Train an approximate index now and save it in the memory directory (sample.py reads it)."""
    layer = memory.stored_layers[0]
    factory = index_factory(memory.knn_index, memory.num_entries(), memory.keys[layer].size(-1))
    if factory != 'Flat':
        t0 = time.time()
        n = save_indexes(memory)
        print(f"search index {memory.knn_index} (FAISS {factory}) for {n} layer(s) x {memory.keys[layer].size(0)} "
              f"heads, trained and saved in {path} in {time.time() - t0:.1f} s")


def reindex(config):
    """Give a saved memory another index choice: the keys and values stay, the manifest records
    knn_index, and the index is built once here to check it can be."""
    memory = load_memory(config['reindex'])
    layer = memory.stored_layers[0]
    check_knn_index(config['knn_index'], memory.keys[layer].size(-1))
    before = memory.knn_index
    memory.meta['knn_index'] = config['knn_index']
    save_index(memory, config['reindex'])  # first: an index FAISS cannot train leaves the manifest as it was
    record_knn_index(config['reindex'], config['knn_index'], memory.num_entries(), memory.keys[layer].size(-1))
    print(f"{config['reindex']}: knn_index {before} -> {config['knn_index']} "
          f"(FAISS {index_factory(config['knn_index'], memory.num_entries(), memory.keys[layer].size(-1))}); "
          f"{memory.num_entries()} stored tokens per head, the model was not run")


if __name__ == '__main__':
    run_cli(main)
