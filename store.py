"""
A memory's directory: the format it is saved in and everything that reads or writes it.

  memory.json        the manifest (manifest(): the schema, written in one place), naming
  memory-<sha>.safetensors  the tensors, layer<l>.keys / layer<l>.values (H_kv, N, d), by checksum
  index-<sha>-<layer>-<factory>.safetensors  saved FAISS indexes, one per layer, each recorded by
                     checksum in the manifest (save_indexes, an explicit step; loading only reads)
  memory.lock        serialises writers

commit() makes every write whole (the old memory or the new one, never half of one); load_memory()
checks the manifest, checksum and shapes, memory-maps values on request, imports the reference's
layout (reference_layout.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings

import numpy as np
import torch

from configurator import UserError
from files import cannot_write, make_dirs, seal, sealed, sha256_file, umask_mode, write_whole
from index_choice import faiss_message, index_factory
from knn_index import SearchSettings
from memory import Memory, check_stored
from reference_layout import import_reference

FORMAT = 'gpt2-persistent-memory'
FORMAT_VERSION = 2        # 2: tensors in memory-<checksum>.safetensors, fingerprints of every weight
READABLE_VERSIONS = (1, 2)
MANIFEST = 'memory.json'
LOCK = 'memory.lock'
TMP_PREFIX = '.tmp-'
INDEX_PREFIX = 'index-'
SPOOL_PREFIX = '.build-'  # a streaming build's folder of rows, inside the memory directory (build.py)
STORE_DTYPES = {'float32': torch.float32, 'float16': torch.float16}  # how keys and values are saved
# what of a memory's meta the manifest keeps, and a load gives back
META_FIELDS = ('model', 'text', 'token_windows', 'bookkeeping_token', 'remove_bookkeeping_token_mem_size',
               'memory_keys', 'retrieval_during_build', 'source', 'knn_index', 'documents')


# -----------------------------------------------------------------------------
# the manifest

def manifest(meta: dict, layers: list[int], dtype: str, num_entries: int) -> dict:
    """The manifest of a memory with this meta, saved with `num_entries` rows per head of
    `layers` in `dtype` (commit adds the tensor file's name and checksum)."""
    model, d = meta['model'], meta['model']['head_size']
    knn_index = meta.get('knn_index') or 'flat'
    return dict(format=FORMAT, format_version=FORMAT_VERSION,
                **{k: meta[k] for k in META_FIELDS if k in meta and k != 'knn_index'},
                layers=sorted(layers), n_head=model['n_head'], n_kv_head=model.get('n_kv_head', model['n_head']),
                head_size=d, num_entries=num_entries, knn_index=knn_index, dtype=dtype,
                index=index_description(knn_index, num_entries, d))


def index_description(knn_index: str, n: int, d: int) -> str:
    """The manifest's words for its index."""
    return (f"{knn_index} (FAISS {index_factory(knn_index, n, d)}), built from the keys when first used and, if "
            f"approximate, saved beside them (index-*.safetensors)")


def save_memory(memory: Memory, path: str, dtype: str | None = None) -> str:
    """Write the memory as a directory: memory.json (the manifest) and the tensors in
    memory-<checksum>.safetensors, which the manifest names (see commit: the path always
    holds a complete memory). dtype: 'float32' or 'float16'; None = as the tensors are."""
    from safetensors.torch import save_file
    dtype = dtype or str(next(iter(memory.keys.values())).dtype).removeprefix('torch.')
    if dtype not in STORE_DTYPES:
        raise UserError(f"store_dtype={dtype!r} must be one of {', '.join(STORE_DTYPES)}")

    def write(tmp):
        save_file({f'layer{l}.{kind}': t[l].to(STORE_DTYPES[dtype]).contiguous()
                   for l in memory.stored_layers for kind, t in (('keys', memory.keys), ('values', memory.values))}, tmp)
    return commit(path, write, manifest(memory.meta, memory.stored_layers, dtype, memory.num_entries()))


def load_memory(path: str, model=None, enc=None, mmap: bool = False, trust_saved_index: bool = False) -> Memory:
    """Load a memory directory: ours (memory.json) or the reference code's layout.
    With a model, refuse a memory that model did not make. mmap: the values stay on disk,
    memory-mapped, and only the rows retrieved are read (the keys are loaded: the search
    index holds them anyway). trust_saved_index: read saved FAISS index files this machine did
    not write (SavedIndexes)."""
    if not os.path.isdir(path):
        raise UserError(f"memory directory {path} does not exist; build one with build_memory.py")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        memory = _load_ours(path, mmap=mmap, trust=trust_saved_index)
    elif os.path.isdir(os.path.join(path, 'keyStore')):
        if model is None or enc is None:
            raise UserError("importing a reference-layout memory needs the model and tokenizer")
        memory = import_reference(path, model, enc)
    else:
        raise UserError(f"{path} holds neither {MANIFEST} nor a reference keyStore/ folder; "
                        f"it is not a memory (build one with build_memory.py)")
    if model is not None:
        memory.check_model(model)
    return memory

def _load_ours(path, tries=3, mmap=False, trust=False):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    rebuild = "rebuild the memory with build_memory.py"
    found = read_manifest(path)
    tensor_file, expected = next(iter(found['tensors'].items()))
    tensor_path = os.path.join(path, tensor_file)
    if not os.path.isfile(tensor_path):
        if tries > 1 and read_manifest(path) != found:  # a save replaced the memory meanwhile
            return _load_ours(path, tries - 1, mmap, trust)
        raise UserError(f"{path} lacks {tensor_file}; the memory is incomplete, {rebuild}")
    if sha256_file(tensor_path) != expected:
        raise UserError(f"{tensor_path} does not match the checksum in {MANIFEST} (truncated or altered); {rebuild}")
    try:
        if mmap:
            from safetensors import safe_open
            with safe_open(tensor_path, framework='pt') as f:
                keys = {int(l): f.get_tensor(f'layer{l}.keys') for l in found['layers']}
            values = {int(l): mapped_tensor(tensor_path, f'layer{l}.values') for l in found['layers']}
        else:
            tensors = load_file(tensor_path)
            keys = {int(l): tensors[f'layer{l}.keys'] for l in found['layers']}
            values = {int(l): tensors[f'layer{l}.values'] for l in found['layers']}
    except (SafetensorError, KeyError, ValueError) as e:
        raise UserError(f"{tensor_path} is unreadable or incomplete ({e}); {rebuild}") from None
    for l in keys:
        check_stored(keys[l], values[l], f"{tensor_path} layer {l}", rebuild)
    meta = {k: found[k] for k in META_FIELDS if k in found}
    recorded, seals = ({k: v for k, v in found[f].items() if isinstance(k, str) and isinstance(v, str)}
                       if isinstance(found.get(f), dict) else {} for f in ('indexes', 'index_seals'))
    return Memory(keys, values, meta, saved_index=SavedIndexes(os.path.abspath(path), expected, recorded, seals, trust))


def read_manifest(path: str) -> dict:
    """memory.json, its structure checked: anything else is a one-line error."""
    f = os.path.join(path, MANIFEST)
    bad = f"{f} is corrupted ({{}}); rebuild the memory with build_memory.py"
    try:
        with open(f, encoding='utf-8') as fh:
            found = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(bad.format(e)) from None
    if not isinstance(found, dict):
        raise UserError(bad.format(f"it holds a {type(found).__name__}, not an object"))
    version = found.get('format_version')
    if found.get('format') != FORMAT or version not in READABLE_VERSIONS:
        raise UserError(f"{f} is format {found.get('format')} v{version}, this code reads {FORMAT} "
                        f"v{', v'.join(map(str, READABLE_VERSIONS))}; rebuild the memory with build_memory.py")
    model, layers, tensors = found.get('model'), found.get('layers'), found.get('tensors')
    if not isinstance(model, dict) or not all(isinstance(model.get(k), int) for k in ('n_layer', 'n_head', 'head_size')):
        raise UserError(bad.format("its 'model' lacks n_layer, n_head or head_size"))
    if not isinstance(layers, list) or not layers or not all(isinstance(l, int) and not isinstance(l, bool)
                                                              for l in layers):
        raise UserError(bad.format("its 'layers' is not a list of layer indices"))
    if not isinstance(tensors, dict) or len(tensors) != 1 or not all(
            isinstance(k, str) and is_tensor_file(k) and isinstance(v, str) for k, v in tensors.items()):
        raise UserError(bad.format("its 'tensors' does not name one tensor file with its checksum"))
    return found


def memory_lock(directory: str):
    """The lock that serialises writers of a memory directory (memory.lock): one instance per
    directory in a process, so it can be held across a read-modify-write (an append) and taken
    again by the commit inside it."""
    from filelock import FileLock
    return FileLock(os.path.join(os.path.abspath(directory), LOCK), is_singleton=True)


def check_outside_memories(path: str, key: str) -> None:
    """Outputs are never written inside a memory directory (a record appended there would spoil
    it): a one-line error if path or a folder above it holds a memory."""
    d, parent = None, os.path.abspath(path)
    while parent != d:
        d, parent = parent, os.path.dirname(parent)
        if os.path.isfile(os.path.join(d, MANIFEST)) or os.path.isdir(os.path.join(d, 'keyStore')):
            raise UserError(f"{key}={path} is inside the memory directory {d}; write outputs elsewhere (e.g. under out/)")


def check_memory_path(path: str) -> None:
    """A memory is written only where none is, where one is, or into a folder of this code's own files."""
    if os.path.exists(path) and not (os.path.isdir(path) and (
            os.path.isfile(os.path.join(path, MANIFEST)) or all(is_own_file(f) for f in os.listdir(path)))):
        raise UserError(f"{path} exists and is not a memory directory; choose another mem_store")


def commit(path: str, write_tensors, fields: dict) -> str:
    """Make `path` a memory directory holding the tensors write_tensors(file) writes and this
    manifest, replacing any memory there.

    The path always holds a complete memory, the old one or the new one: the new tensors are
    written under their own name first, then the manifest is replaced in one rename (the
    switch), then the old tensors are removed. A save killed at any point leaves the old
    memory loadable (and perhaps a temporary or unreferenced file, which the next save
    removes). Saves to one path are serialised by a lock file, memory.lock. Only this code's
    own files are ever removed."""
    path = os.path.abspath(path)
    check_memory_path(path)
    make_dirs(path)
    try:
        with memory_lock(path):
            for f in os.listdir(path):  # left by a save that was killed
                if is_temporary(f):
                    os.remove(os.path.join(path, f))
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix='.safetensors', dir=path)
            os.close(fd)
            write_tensors(tmp)
            checksum = sha256_file(tmp)
            name = f"memory-{checksum[:16]}.safetensors"
            os.chmod(tmp, umask_mode())
            os.replace(tmp, os.path.join(path, name))
            try:  # the same tensors again: the indexes recorded for them stay recorded
                old = read_manifest(path) if os.path.isfile(os.path.join(path, MANIFEST)) else {}
            except UserError:
                old = {}
            kept = {f: {k: v for k, v in (old.get(f) if isinstance(old.get(f), dict) else {}).items() if isinstance(k, str) and k.startswith(
                f"{INDEX_PREFIX}{checksum[:16]}-") and os.path.isfile(os.path.join(path, k))} for f in ('indexes', 'index_seals')}
            write_whole(os.path.join(path, MANIFEST), json.dumps(dict(fields, tensors={name: checksum}, **{
                f: v for f, v in kept.items() if v}), indent=1, ensure_ascii=False))
            for f in os.listdir(path):  # the tensors of the memory this one replaced, and their indexes
                if (is_tensor_file(f) and f != name) or (is_index_file(f) and
                                                         not f.startswith(f"{INDEX_PREFIX}{checksum[:16]}-")):
                    os.remove(os.path.join(path, f))
    except OSError as e:
        raise cannot_write(path, e) from None
    return path


def mapped_tensor(path, name):
    """A read-only tensor memory-mapped from a safetensors file: its header (8 bytes of length,
    then JSON: dtype, shape, data_offsets) says where the tensor's bytes lie."""
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(n))
    info = header[name]
    dtype = {'F32': np.float32, 'F16': np.float16}.get(info['dtype'])
    if dtype is None:
        raise ValueError(f"{name} is stored as {info['dtype']}; memory-mapping reads F32 and F16")
    start, end = info['data_offsets']
    if (end - start) != int(np.prod(info['shape'])) * np.dtype(dtype).itemsize:
        raise ValueError(f"{name}'s data_offsets do not match its shape")
    array = np.memmap(path, dtype=dtype, mode='r', offset=8 + n + start, shape=tuple(info['shape']))
    with warnings.catch_warnings():  # read-only by design: the memory never writes its values
        warnings.simplefilter('ignore', UserWarning)
        return torch.from_numpy(array)


def is_tensor_file(name):
    """A memory's tensor file: memory-<checksum>.safetensors (memory.safetensors before format 2)."""
    return name == 'memory.safetensors' or (len(name) == 35 and name.startswith('memory-') and
                                            name.endswith('.safetensors') and all(c in '0123456789abcdef' for c in name[7:23]))


# -----------------------------------------------------------------------------
# saved indexes

def index_file_name(checksum: str, layer: int, factory: str) -> str:
    """index-<tensors' checksum>-<layer>-<factory's digest>.safetensors: one layer's saved FAISS
    indexes, one per head, valid beside the tensor file with that checksum only."""
    return f"{INDEX_PREFIX}{checksum[:16]}-{layer}-{hashlib.sha256(factory.encode()).hexdigest()[:8]}.safetensors"


def is_index_file(name):
    return name.startswith(INDEX_PREFIX) and name.endswith('.safetensors')


def is_temporary(name):
    """A save's temporary file: the tensors' (.tmp-*), the manifest's or an index's
    (.memory.json.tmp-*, .index-*.tmp-*: files.write_whole)."""
    return name.startswith(TMP_PREFIX) or name.startswith(f'.{MANIFEST}.tmp-') or \
        (name.startswith(f'.{INDEX_PREFIX}') and '.tmp-' in name)


def is_own_file(name):
    return name in (MANIFEST, LOCK) or is_temporary(name) or is_tensor_file(name) or is_index_file(name) or \
        name.startswith(SPOOL_PREFIX)


class SavedIndexes:
    """Memory.saved_index of a memory loaded from `directory` with tensor checksum `checksum`:
    (layer, factory) -> ((heads' bytes, metadata) or None, the file's path). Only reads. A file
    is used only if the manifest records its SHA-256 (save_indexes), it still has it, the
    manifest's seal of it was made on this machine (files.seal; or trust: any recorded file),
    and its metadata names these tensors, layer and factory; else a warning, and the index is
    built again: FAISS never reads bytes from elsewhere, whose sizes deep inside (lists, graph)
    it would trust. KNNIndex then checks the header, and that the index finds the keys."""

    def __init__(self, directory: str, checksum: str, recorded: dict | None = None, seals: dict | None = None,
                 trust: bool = False):
        self.directory, self.checksum, self.recorded = directory, checksum, dict(recorded or {})
        self.seals, self.trust = dict(seals or {}), trust

    def file(self, layer: int, factory: str) -> str:
        return os.path.join(self.directory, index_file_name(self.checksum, layer, factory))

    def __call__(self, layer: int, factory: str):
        file = self.file(layer, factory)
        if not os.path.isfile(file):
            return None, file
        name = os.path.basename(file)
        why = None if name in self.recorded else f"{MANIFEST} does not record it"
        if why is None and sha256_file(file) != self.recorded[name]:
            why = f"it does not match the checksum {MANIFEST} records (altered or replaced)"
        if why is None and not self.trust and not sealed(self.recorded[name], self.seals.get(name)):
            warnings.warn(f"{file} was not saved on this machine, and FAISS reads no index files from elsewhere; "
                          f"building the index again (build_memory.py --reindex={self.directory} saves it here; "
                          f"trust_saved_index=True reads it)", stacklevel=3)
            return None, file
        if why:
            warnings.warn(f"{file} is not the index saved for these keys ({why}); building the index again "
                          f"(build_memory.py --reindex={self.directory} --knn_index=... saves it)", stacklevel=3)
            return None, file
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(file, 'np') as f:
                saved = ({name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            warnings.warn(f"{file} is unreadable ({faiss_message(e)}); building the index again", stacklevel=3)
            return None, file
        bound = dict(tensors=self.checksum, layer=str(layer), factory=factory)
        if any(saved[1].get(k) != v for k, v in bound.items()):
            warnings.warn(f"{file} was saved for other keys ({ {k: saved[1].get(k) for k in bound} }); building the "
                          f"index again", stacklevel=3)
            return None, file
        return saved, file


def save_indexes(memory: Memory) -> int:
    """Train (or read) every stored layer's approximate index for the memory's own knn_index and
    save those not already saved whole, calibration included, in the directory the memory was
    loaded from, named by the checksum of the tensors it was loaded with (FAISS on the CPU), and
    record each file's SHA-256 in the manifest, which is what lets a later load trust it. The
    explicit step that build_memory.py takes, so that later loads read the index instead of
    training it. Returns the number of layers indexed."""
    from safetensors.numpy import save
    saved = memory.saved_index
    if not isinstance(saved, SavedIndexes):
        raise UserError("only a memory loaded from its directory (load_memory) can save its search indexes there")
    written = {}
    for layer in memory.stored_layers:
        _, _, index = memory.layer_index(layer, 'cpu', SearchSettings(search='faiss'))
        if index.factory == 'Flat' or (index.from_saved and not index.calibrated_now):
            continue
        heads, meta = index.serialized()
        data = save(heads, dict(meta, tensors=saved.checksum, layer=str(layer), factory=index.factory))
        file = saved.file(layer, index.factory)
        write_whole(file, data)
        written[os.path.basename(file)] = hashlib.sha256(data).hexdigest()
    seals = {name: seal(digest) for name, digest in written.items()}
    if written:
        try:
            with memory_lock(saved.directory):
                found = read_manifest(saved.directory)
                if next(iter(found['tensors'].values())) != saved.checksum:
                    raise UserError(f"{saved.directory} holds another version of the memory now; load it again "
                                    f"and save its indexes then")
                for field, new in (('indexes', written), ('index_seals', seals)):
                    old = found.get(field) if isinstance(found.get(field), dict) else {}
                    kept = {k: v for k, v in old.items() if isinstance(k, str) and os.path.isfile(os.path.join(saved.directory, k))}
                    found[field] = {k: v for k, v in dict(kept, **new).items() if v is not None}
                write_whole(os.path.join(saved.directory, MANIFEST), json.dumps(found, indent=1, ensure_ascii=False))
        except OSError as e:
            raise cannot_write(saved.directory, e) from None
        saved.recorded.update(written)
        saved.seals.update({k: v for k, v in seals.items() if v is not None})
    return len(memory.stored_layers)


def record_knn_index(path: str, knn_index: str, n: int, d: int) -> None:
    """Give the memory directory at path (n stored keys of size d per head) another index
    choice: only its manifest changes (the tensors, and the indexes saved for them, stay)."""
    path = os.path.abspath(path)
    try:
        with memory_lock(path):
            found = read_manifest(path)
            found.update(knn_index=knn_index, index=index_description(knn_index, n, d))
            write_whole(os.path.join(path, MANIFEST), json.dumps(found, indent=1, ensure_ascii=False))
    except OSError as e:
        raise cannot_write(path, e) from None
