"""
Building a memory (docs/method.md section 1): the plain model runs over the memory's tokens in
windows of at most block_size, each starting with its bookkeeping token, and the keys and
values of every key/value head of the chosen layers are kept, one row per stored token.

  build_from_text / build_from_ids   one text, in RAM: a memory.Memory
  build_documents                    many documents (a file or a folder), streamed to disk and
                                     committed whole as a memory directory (store.py), or
                                     appended to one

Both go through one set of checks (check_build) and one pass over windows (window_rows).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import torch

from configurator import UserError
from files import make_dirs, read_text_file
from memory import MEMORY_KEYS, Memory, model_identity
from store import SPOOL_PREFIX, STORE_DTYPES, check_memory_path, commit, load_memory, manifest, memory_lock
from tokenizer import encode
from transformer import PLAIN


def check_build(model, layers: list[int] | None, memory_keys: str, n_skip: int, dtype: str = 'float32') -> list[int]:
    """One-line errors for build settings this model cannot use; returns the layers, sorted
    (None: every layer)."""
    cfg = model.config
    layers = list(range(cfg.n_layer)) if layers is None else sorted(set(layers))
    bad = [l for l in layers if not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < cfg.n_layer]
    if bad or not layers:
        raise UserError(f"layers {bad or layers} are not layers of this {cfg.n_layer}-layer model; "
                        f"use indices 0..{cfg.n_layer - 1}")
    if memory_keys not in MEMORY_KEYS:
        raise UserError(f"memory_keys={memory_keys!r} must be one of {', '.join(map(repr, MEMORY_KEYS))}")
    if memory_keys == 'rotated' and model.rope is None:
        raise UserError(f"memory_keys='rotated' needs a model with rotary position embeddings; "
                        f"{model.name} ({cfg.arch}) has none: use 'unrotated'")
    if not isinstance(n_skip, int) or isinstance(n_skip, bool) or n_skip < 0:
        raise UserError(f"remove_bookkeeping_token_mem_size={n_skip!r} must be a whole number >= 0")
    if dtype not in STORE_DTYPES:
        raise UserError(f"store_dtype={dtype!r} must be one of {', '.join(STORE_DTYPES)}")
    return layers


def build_meta(model, windows, bookkeeping_token, n_skip, memory_keys, text=None, **more) -> dict:
    """A built memory's provenance (store.manifest saves it)."""
    return dict(model=model_identity(model), text=text, token_windows=windows, bookkeeping_token=bookkeeping_token,
                remove_bookkeeping_token_mem_size=n_skip, memory_keys=memory_keys, retrieval_during_build=False,
                source='built', **more)


def memory_token_windows(ids: list[int], n_bookkeeping: int, block_size: int) -> list[list[int]]:
    """Split a tokenized memory (its first n_bookkeeping ids are the bookkeeping token) into
    windows of at most block_size tokens, each starting with its own bookkeeping token."""
    prefix, body = ids[:n_bookkeeping], ids[n_bookkeeping:]
    width = block_size - len(prefix)
    if width <= 0:
        raise UserError(f"the bookkeeping token takes {len(prefix)} tokens, leaving no room in block_size {block_size}")
    return [prefix + body[i:i + width] for i in range(0, len(body), width)]


@torch.no_grad()
def window_rows(model, windows: list[list[int]], layers: list[int], n_skip: int, memory_keys: str, batch_size: int):
    """The plain model over memory windows (docs/method.md section 1), consecutive windows of one
    length as one batch. Yields (windows done, {layer: (keys, values)}), each (H_kv, rows, d)
    on the CPU, one row per stored token in order (the first n_skip of each window dropped)."""
    device = next(model.parameters()).device
    i = 0
    while i < len(windows):
        group = [windows[i]]
        while i + len(group) < len(windows) and len(group) < batch_size and \
                len(windows[i + len(group)]) == len(group[0]):
            group.append(windows[i + len(group)])
        x = torch.tensor(group, dtype=torch.long, device=device)
        _, kv, _ = model.run_blocks(model.embed(x), 0, max(layers) + 1, how=PLAIN)
        rows = {}
        for l in layers:
            k, v = kv[l]  # (B, H_kv, T, d): the attention block's own k (before RoPE) and v
            if memory_keys == 'rotated':  # as attention sees them, positions from the window's start
                k = model.rope(k, 0)
            # one row per token, in order: (B, H, T', d) -> (H, B*T', d)
            rows[l] = tuple(t[:, :, n_skip:].transpose(0, 1).reshape(t.size(1), -1, t.size(-1)).cpu() for t in (k, v))
        i += len(group)
        yield len(group), rows


@torch.no_grad()
def build_from_text(model, enc, text: str, layers: list[int] | None = None, bookkeeping_token: str = '\n',
          remove_bookkeeping_token_mem_size: int | None = None, progress: bool = False, batch_size: int = 8,
          memory_keys: str = 'unrotated') -> Memory:
    """docs/method.md section 1. `text` is tokenized as given: it starts with its bookkeeping token
    (run.memory_text puts it in front of a text read from a file). The first
    remove_bookkeeping_token_mem_size tokens (default: the leading tokens of the bookkeeping
    token alone, a BOS token included where the tokenizer adds one) are not stored. The
    plain model runs over the tokens, retrieval off, in windows of at most block_size
    tokens. memory_keys: store keys before RoPE ('unrotated') or as attention sees them
    at their window position ('rotated'); see docs/method.md section 8."""
    bk_ids = encode(enc, bookkeeping_token) if bookkeeping_token else []
    n_skip = len(bk_ids) if remove_bookkeeping_token_mem_size is None else remove_bookkeeping_token_mem_size
    return build_from_ids(model, encode(enc, text), layers, n_skip, progress=progress, batch_size=batch_size,
                          text=text, bookkeeping_token=bookkeeping_token, memory_keys=memory_keys)

@torch.no_grad()
def build_from_ids(model, ids: list[int], layers: list[int] | None = None, n_skip: int = 1,
                   progress: bool = False, batch_size: int = 8, text: str | None = None,
                   bookkeeping_token: str | None = None, memory_keys: str = 'unrotated') -> Memory:
    """Build from token ids whose first n_skip ids are the bookkeeping token (not stored)."""
    layers = check_build(model, layers, memory_keys, n_skip)
    if len(ids) <= n_skip:
        raise UserError(f"the memory text has {len(ids)} tokens, nothing left to store after removing "
                        f"{n_skip} bookkeeping token(s); give it some text")
    windows = memory_token_windows(list(ids), n_skip, model.config.block_size)
    keys = {l: [] for l in layers}
    values = {l: [] for l in layers}
    from tqdm import tqdm
    bar = tqdm(total=len(windows), desc='building memory', unit='window', disable=not progress)
    for n, rows in window_rows(model, windows, layers, n_skip, memory_keys, batch_size):
        for l, (k, v) in rows.items():
            keys[l].append(k)
            values[l].append(v)
        bar.update(n)
    bar.close()
    meta = build_meta(model, windows, bookkeeping_token, n_skip, memory_keys, text=text)
    return Memory({l: torch.cat(keys[l], 1).float().contiguous() for l in layers},
               {l: torch.cat(values[l], 1).float().contiguous() for l in layers}, meta)


def read_documents(path: str) -> list[tuple[str, str]]:
    """(name, file) of each document: a text file is one; a folder's .txt files (sorted) are
    one each."""
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; give a text file or a folder of .txt files")
    if not os.path.isdir(path):
        raise UserError(f"{path} is neither a text file nor a folder of them")
    files = sorted(f for f in os.listdir(path) if f.endswith('.txt') and not f.startswith('.')
                   and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise UserError(f"folder {path} holds no .txt files; put one text file per document in it")
    return [(f, os.path.join(path, f)) for f in files]


def write_tensors(tmp, layers, H, d, rows, dtype, sources):
    """A memory's tensor file, streamed: safetensors' 8 bytes of header length, the JSON header,
    then layer{l}.keys and layer{l}.values (H, rows, d), each head's rows from sources(l, kind, h),
    a list of tensors (H_i, d) or spool files of raw rows, in row order."""
    np_dtype = np.float16 if dtype == 'float16' else np.float32
    names = [(l, kind) for l in layers for kind in ('keys', 'values')]
    size = H * rows * d * np.dtype(np_dtype).itemsize
    header = {f'layer{l}.{kind}': dict(dtype='F16' if dtype == 'float16' else 'F32', shape=[H, rows, d],
                                       data_offsets=[i * size, (i + 1) * size])
              for i, (l, kind) in enumerate(names)}
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    with open(tmp, 'wb') as out:
        out.write(len(text).to_bytes(8, 'little'))
        out.write(text)
        for l, kind in names:
            for h in range(H):
                for src in sources(l, kind, h):
                    if isinstance(src, str):
                        with open(src, 'rb') as f:
                            shutil.copyfileobj(f, out, 1 << 24)
                    else:
                        out.write(np.ascontiguousarray(src.numpy()).astype(np_dtype, copy=False).tobytes())


def shard_of(documents: list, shard: str) -> list:
    """shard 'i/n': the i-th of n contiguous groups of the documents (in order), so that the
    groups' memories merged in order hold the rows of one build of them all."""
    try:
        i, n = (int(x) for x in shard.split('/'))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"shard={shard!r} must be 'i/n' with 0 <= i < n, e.g. --shard=0/4") from None
    if n > len(documents):
        raise UserError(f"shard={shard}: {n} shards of {len(documents)} documents; use at most {len(documents)} shards")
    return documents[i * len(documents) // n:(i + 1) * len(documents) // n]


def merge_parts(model, enc, parts: list[str], path: str, knn_index: str | None = None) -> str:
    """One memory at path from the memories of parts (built from consecutive groups of
    documents, shard_of), in order: the rows, documents and windows a single build of all the
    documents gives. Written whole (commit); the parts are left as they are. knn_index: the
    merged memory's index choice (default: the parts')."""
    mems = [load_memory(p, model, enc, mmap=True) for p in parts]
    first = mems[0]
    layers, dtype = first.stored_layers, str(first.keys[first.stored_layers[0]].dtype).removeprefix('torch.')
    for p, m in zip(parts, mems):
        got = (m.stored_layers, str(m.keys[m.stored_layers[0]].dtype).removeprefix('torch.'), m.memory_keys,
               m.knn_index, m.meta.get('bookkeeping_token'), m.meta.get('remove_bookkeeping_token_mem_size'))
        want = (layers, dtype, first.memory_keys, first.knn_index, first.meta.get('bookkeeping_token'),
                first.meta.get('remove_bookkeeping_token_mem_size'))
        if got != want:
            raise UserError(f"{p} was built with other settings than {parts[0]} (layers, dtype, keys, index or "
                            f"bookkeeping token: {got} against {want}); build the parts alike")
    docs, windows, rows = [], [], 0
    for m in mems:
        for doc in m.meta['documents']:
            docs.append(dict(doc, first_row=doc['first_row'] + rows))
        windows += m.meta['token_windows']
        rows += m.num_entries()
    meta = build_meta(model, windows, first.meta['bookkeeping_token'], first.meta['remove_bookkeeping_token_mem_size'],
                      first.memory_keys, text=first.meta.get('text') if len(mems) == 1 else None, documents=docs,
                      knn_index=knn_index or first.knn_index)

    def sources(l, kind, h):
        return [(m.keys if kind == 'keys' else m.values)[l][h] for m in mems]

    H, d = first.keys[layers[0]].shape[0], first.keys[layers[0]].shape[2]
    path = os.path.abspath(path)
    check_memory_path(path)
    make_dirs(path)
    return commit(path, lambda tmp: write_tensors(tmp, layers, H, d, rows, dtype, sources), manifest(meta, layers, dtype, rows))


class SpoolFiles:
    """The spooled rows of a build, one file per layer, kind and head, opened only while a
    batch is written to it (a model with many layers and heads would otherwise hold more files
    open than the system allows)."""

    def __init__(self, folder):
        self.folder = folder

    def write(self, name, data):
        with open(os.path.join(self.folder, name), 'ab') as f:
            f.write(data)


def remove_stale_spools(path):
    """Remove the spool folders of builds into path whose process is gone (killed); a live
    build's spool (its pid is in the name) is left alone."""
    for f in os.listdir(path):
        if f.startswith(SPOOL_PREFIX) and os.path.isdir(os.path.join(path, f)):
            pid = f[len(SPOOL_PREFIX):].split('-', 1)[0]
            try:
                alive = pid.isdigit() and (os.kill(int(pid), 0) is None)
            except (ProcessLookupError, PermissionError) as e:
                alive = isinstance(e, PermissionError)
            if not alive:
                shutil.rmtree(os.path.join(path, f), ignore_errors=True)


def build_documents(model, enc, documents: list[tuple[str, str]], path: str, append: bool = False, **how) -> str:
    """_build_documents; an append holds the memory's lock from reading it to committing the new
    version, so two appends at once run one after the other and neither loses rows."""
    if not append:
        return _build_documents(model, enc, documents, path, **how)
    with memory_lock(path):
        return _build_documents(model, enc, documents, path, append=True, **how)


def _build_documents(model, enc, documents: list[tuple[str, str]], path: str, layers: list[int] | None = None,
                     bookkeeping_token: str = '\n', n_skip: int | None = None, memory_keys: str = 'unrotated',
                     batch_size: int = 8, dtype: str = 'float32', knn_index: str = 'flat', append: bool = False,
                     progress: bool = True) -> str:
    """docs/method.md section 1 over many documents, streamed to disk: each document gets the
    bookkeeping token in front and is windowed on its own, its windows go through the plain
    model in batches, and the rows are spooled to files per layer, kind and head inside the
    memory directory, so memory use stays at one batch. The memory is then written whole
    (commit): an interrupted build leaves the directory as it was. append=True adds the
    documents to the memory at path (same layers and bookkeeping), which stays readable until
    the new version is complete; the rows are those a build of all documents would store.
    The manifest records each document's name, first row, rows and tokens. Returns the path."""
    from tqdm import tqdm
    cfg = model.config
    base = load_memory(path, model, enc, mmap=True) if append else None
    if base is not None:
        layers, bookkeeping_token = base.stored_layers, base.meta.get('bookkeeping_token')
        n_skip, memory_keys = base.meta.get('remove_bookkeeping_token_mem_size'), base.memory_keys
        knn_index = base.knn_index
        dtype = str(base.keys[layers[0]].dtype).removeprefix('torch.')
        if bookkeeping_token is None or n_skip is None:
            raise UserError(f"{path} does not record its bookkeeping token; rebuild it to append to it")
    n_skip = len(encode(enc, bookkeeping_token)) if n_skip is None and bookkeeping_token else (n_skip or 0)
    layers = check_build(model, layers, memory_keys, n_skip, dtype)
    path = os.path.abspath(path)
    check_memory_path(path)
    created = not os.path.exists(path)
    make_dirs(path)
    remove_stale_spools(path)
    spool = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=path)
    done = False
    H, d = cfg.n_kv_head, cfg.head_dim
    np_dtype = np.float16 if dtype == 'float16' else np.float32
    try:
        files = SpoolFiles(spool)
        first = base.num_entries() if base is not None else 0
        rows, docs, windows_all = first, [], []
        bar = one_text = None
        # the bar's total (and so its time left) is estimated from the tokens per byte of the text read so far
        sizes = {file: os.path.getsize(file) if os.path.isfile(file) else 0 for _, file in documents}
        total_bytes, read_bytes, read_tokens = sum(sizes.values()), 0, 0
        for name, file in documents:
            text = bookkeeping_token + read_text_file(file, 'memory')
            one_text = text if base is None and len(documents) == 1 else None  # a memory of one text keeps it
            ids = encode(enc, text)
            if bar is None:  # after the first document is read: a bad file's error comes alone
                bar = tqdm(total=None, desc='building memory', unit='tok', unit_scale=True, disable=not progress)
            windows = memory_token_windows(ids, n_skip, cfg.block_size)
            read_bytes += sizes[file]
            read_tokens += sum(len(w) for w in windows)
            bar.total = max(read_tokens, round(read_tokens * total_bytes / max(read_bytes, 1)))
            bar.refresh()
            start, fed = rows, 0
            for n, got in window_rows(model, windows, layers, n_skip, memory_keys, batch_size):
                for l, (k, v) in got.items():
                    for kind, t in (('keys', k), ('values', v)):
                        for h in range(H):
                            files.write(f"{l}.{kind}.{h}", t[h].numpy().astype(np_dtype).tobytes())
                rows += next(iter(got.values()))[0].size(1)
                bar.update(sum(len(w) for w in windows[fed:fed + n]))
                fed += n
            docs.append(dict(name=name, first_row=start, rows=rows - start, tokens=len(ids)))
            windows_all += windows
        if bar is not None:
            bar.close()
        if rows == first:
            raise UserError("the documents hold no tokens to store after the bookkeeping token; give them some text")

        def sources(l, kind, h):  # the rows of one head, in order: the memory appended to, then the new ones
            old = [(base.keys if kind == 'keys' else base.values)[l][h]] if base is not None else []
            return old + [os.path.join(spool, f"{l}.{kind}.{h}")]

        if base is not None:
            old_docs = base.meta.get('documents') or [dict(name='memory text', first_row=0, rows=first,
                                                           tokens=sum(len(w) for w in base.meta['token_windows']))]
            docs, windows_all = old_docs + docs, base.meta['token_windows'] + windows_all
        meta = build_meta(model, windows_all, bookkeeping_token, n_skip, memory_keys, text=one_text, documents=docs,
                          knn_index=knn_index)
        path = commit(path, lambda tmp: write_tensors(tmp, layers, H, d, rows, dtype, sources),
                      manifest(meta, layers, dtype, rows))
        done = True
        return path
    finally:
        if locals().get('bar') is not None:
            bar.close()  # before an error's message is printed, so the bar does not cut into it
        shutil.rmtree(spool, ignore_errors=True)
        if created and not done:  # a build that fails leaves no folder behind
            shutil.rmtree(path, ignore_errors=True)
