"""
Build a persistent memory from a text file or a folder of them and save it as a directory.

    python build_memory.py data/vancouver.txt --init_from=gpt2 --mem_store=out/vancouver --layers=[9]
    python build_memory.py data/ --init_from=gpt2 --mem_store=out/data --layers=[9]    # one document per .txt file
    python build_memory.py more.txt --mem_store=out/vancouver --append=True           # add to a memory
    python build_memory.py docs/ --mem_store=out/big --launcher=slurm --shards=8      # on a cluster, merged

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

With a launcher (--launcher=slurm, or local for this machine) and --shards=n, a folder's
documents are split into n consecutive groups, each built as a job into <mem_store>.parts/,
and the parts are merged in order into one memory whose rows are those of a single build.
"""

import contextlib
import os
import shutil
import sys
import time

from configurator import REPOSITORY, UserError, answer_help, configure, run_cli
from launch import LAUNCH_DEFAULTS

DEFAULTS = dict(
    init_from='gpt2',      # as in sample.py: a GPT-2 name, hub id, checkpoint directory, GGUF file or 'smollm2-135m'
    mem_store='',          # output directory; default out/<text file name>
    layers=None,           # layer indices to store, e.g. [6, 7, 8]; None = all layers
    bookkeeping_token='\n',  # put in front of the text (and of every window)
    remove_bookkeeping_token_mem_size=None,  # leading tokens of each window not stored; None = the bookkeeping token's length
    memory_keys='unrotated',  # RoPE models: keys before RoPE ('unrotated') or as attention sees them ('rotated')
    knn_index='flat',      # the memory's search index: 'flat' (exact), 'hnsw', 'ivf', 'ivfsq', 'ivfpq', 'ivfpqfs' or a FAISS factory string
    reindex='',            # a memory directory to give another knn_index, without running the model (no text file)
    store_dtype='float32',  # keys and values saved as 'float32' or 'float16' (half the disk and RAM)
    append=False,          # add the documents to the memory at mem_store (a new version, written whole)
    batch_size=8,          # windows that go through the model together
    device='cpu',          # 'cpu', 'cuda', 'cuda:1', ...
    dtype='float32',       # 'float32', 'bfloat16' or 'float16'
    shard='',              # 'i/n': build only the i-th of n consecutive groups of the folder's documents, into parts_dir
    parts_dir='',          # with shard: where the part goes (parts_dir/i-of-n); the launcher sets it
    **LAUNCH_DEFAULTS,     # run shards as jobs and merge them (launch.py)
)
if __name__ == '__main__':  # --help answers here, before torch and FAISS are imported (seconds)
    answer_help(DEFAULTS, __doc__, [__file__, os.path.join(REPOSITORY, 'launch.py')])

from build import build_documents, merge_parts, read_documents, shard_of
from index_choice import check_knn_index, index_factory
from launch import check_launch, launch_shards, shard_argv
from run import load_model
from store import check_outside_memories, load_memory, memory_lock, record_knn_index, save_indexes


def main(argv):
    if '--help' in argv or '-h' in argv:
        configure(DEFAULTS, argv, __doc__, [sys.modules[__name__], os.path.join(REPOSITORY, 'launch.py')])
    texts = [a for a in argv if not a.startswith('--') and not a.endswith('.py')]
    if not texts:
        config = configure(DEFAULTS, argv)
        if config['reindex']:
            return reindex(config)
    if len(texts) != 1:
        raise UserError("give one text file or folder: python build_memory.py FILE_OR_FOLDER [--key=value ...]")
    config = configure(DEFAULTS, [a for a in argv if a not in texts])
    check_launch(config)
    documents = read_documents(texts[0])
    layers = config['layers']
    if layers is not None and (not isinstance(layers, (list, tuple)) or not all(isinstance(l, int) for l in layers)):
        raise UserError(f"layers={layers!r} must be a list of layer indices, e.g. --layers=[9]")
    if config['launcher']:
        return build_sharded(config, texts[0], documents, [a for a in argv if a not in texts])
    if config['shard']:
        if not config['parts_dir']:
            raise UserError("shard=i/n builds one part of a sharded build into parts_dir; give --parts_dir=DIR "
                            "(or let --launcher=local|slurm --shards=n do both)")
        part = os.path.join(config['parts_dir'], config['shard'].replace('/', '-of-'))
        documents = shard_of(documents, config['shard'])
        if part_is_built(part, documents):
            print(f"{part} already holds this part; nothing to do")
            return
        config = dict(config, mem_store=part, knn_index='flat')  # the merged memory gets the index
    mem_store = config['mem_store'] or os.path.join('out', os.path.splitext(os.path.basename(os.path.normpath(texts[0])))[0])
    check_outside_memories(os.path.dirname(os.path.abspath(mem_store)), 'mem_store')
    if config['append'] and not os.path.isfile(os.path.join(mem_store, 'memory.json')):
        raise UserError(f"append=True adds to a memory, but {mem_store} holds none; build it first (without --append)")
    if config['append']:
        check_append(config, argv, mem_store)
    model, enc = load_model(config)
    check_knn_index(config['knn_index'], model.config.head_dim)  # a bad index choice fails before the model runs
    if config['append'] and config['shard']:
        raise UserError("append=True and shard are alternatives: append to a memory, or build one in parts")
    t0 = time.time()
    # an append holds the memory's lock from reading it to saving its index: appends run one at a time
    with memory_lock(mem_store) if config['append'] else contextlib.nullcontext():
        path = build_documents(model, enc, documents, mem_store, layers=layers,
                               bookkeeping_token=config['bookkeeping_token'],
                               n_skip=config['remove_bookkeeping_token_mem_size'], memory_keys=config['memory_keys'],
                               batch_size=config['batch_size'], dtype=config['store_dtype'],
                               knn_index=config['knn_index'], append=config['append'])
        memory = load_memory(path, model, enc, mmap=True)  # once: it checks the tensors' checksum
        describe(memory, path, documents, time.time() - t0, config['append'], texts[0])
        if not config['shard']:
            save_index(memory, path)


APPEND_KEYS = {  # a key of this build -> the manifest field an append must match
    'layers': 'layers', 'store_dtype': 'dtype', 'knn_index': 'knn_index', 'bookkeeping_token': 'bookkeeping_token',
    'memory_keys': 'memory_keys', 'remove_bookkeeping_token_mem_size': 'remove_bookkeeping_token_mem_size'}


def check_append(config, argv, mem_store):
    """An append keeps the memory's own settings: one given here (on the command line or in a
    config file, or not the default) that differs from the memory's is an error naming both."""
    from store import read_manifest
    found = read_manifest(mem_store)
    named = {a[2:].split('=', 1)[0] for a in argv if a.startswith('--')}
    for key, field in APPEND_KEYS.items():
        given = config[key]
        if key not in named and given == DEFAULTS[key]:
            continue  # not asked for: the memory's own applies
        theirs = found.get(field)
        if key == 'layers' and given is not None:
            given = sorted(given)
        if given is not None and given != theirs:
            raise UserError(f"append=True: {key}={given!r} differs from the memory's {theirs!r} ({mem_store}); an append "
                            f"keeps the memory's settings: leave {key} out, or build a new memory"
                            + (" (or append, then --reindex to change the index)" if key == 'knn_index' else ''))


def part_is_built(part, documents):
    """A part of a sharded build that an earlier attempt finished (its documents, in order)."""
    from store import read_manifest
    try:
        meta = read_manifest(part)
    except (UserError, OSError, ValueError):
        return False
    return [d.get('name') for d in meta.get('documents') or []] == [name for name, _ in documents]


def build_sharded(config, text, documents, argv):
    """The folder's documents in `shards` groups, each built as a job into <mem_store>.parts/,
    then merged in order into mem_store (written whole: an interrupted merge leaves it as it was)."""
    n = config['shards']
    if config['append'] or config['reindex'] or config['shard']:
        raise UserError("a launcher builds a new memory in shards; it does not combine with append, reindex or shard")
    for i in range(n):
        shard_of(documents, f"{i}/{n}")  # too many shards for the documents: an error before anything is submitted
    mem_store = config['mem_store'] or os.path.join('out', os.path.splitext(os.path.basename(os.path.normpath(text)))[0])
    check_outside_memories(os.path.dirname(os.path.abspath(mem_store)), 'mem_store')
    parts_dir = os.path.abspath(mem_store.rstrip('/\\') + '.parts')
    child = [text] + shard_argv(argv, {'mem_store', 'parts_dir', 'shard'}) + [f'--parts_dir={parts_dir}']
    model, enc = load_model(config)  # here too: the merge needs it, and a bad model or index fails before submitting
    check_knn_index(config['knn_index'], model.config.head_dim)
    t0 = time.time()
    failed = launch_shards(config, os.path.abspath(__file__), child, os.path.join(parts_dir, 'jobs'))
    if not config['wait']:
        print("when the jobs are done, run the same command with --wait=True to merge (finished parts are not rebuilt)")
        return
    if failed:
        raise UserError(f"{len(failed)} of {n} parts failed ({', '.join(f'{i}/{n}' for i in failed)}); their logs are "
                        f"named above; run the same command again to retry them (finished parts are kept)")
    parts = [os.path.join(parts_dir, f"{i}-of-{n}") for i in range(n)]
    path = merge_parts(model, enc, parts, mem_store, knn_index=config['knn_index'])
    shutil.rmtree(parts_dir, ignore_errors=True)
    memory = load_memory(path, model, enc, mmap=True)
    describe(memory, path, documents, time.time() - t0, False, f"{text} ({n} parts merged)")
    save_index(memory, path)


def describe(memory, path, documents, seconds, append, source):
    """What was stored (memory, loaded from path), printed after a build."""
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    m = memory.meta
    tokens = sum(d['tokens'] for d in m['documents'][-len(documents):])
    print(f"stored {memory.num_entries()} tokens per head from {sum(len(w) for w in m['token_windows'])} tokens "
          f"in {len(m['token_windows'])} window(s) of {len(m['documents'])} document(s)"
          + (f" ({len(documents)} appended)" if append else f" of {source}"))
    print(f"model {m['model']['name']} (weights {m['model']['fingerprint']}), layers {memory.stored_layers}, "
          f"{memory.keys[memory.stored_layers[0]].size(0)} key/value heads (of {m['model']['n_head']} query heads) of size "
          f"{m['model']['head_size']}; {tokens / max(seconds, 1e-9):.0f} tokens/s")
    print(f"{size / 1e6:.2f} MB on disk at {path} (keys and values in {str(memory.values[memory.stored_layers[0]].dtype).removeprefix('torch.')})")


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
