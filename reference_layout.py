"""
The reference code's saved memory layout (docs/method.md section 5), read as a Memory:
keyStore/<layer>/<head>.pt and valueStore/<layer>/<head>.pt, row 0 a sentinel, and the
memory's text beside them. Only tensors are read (torch.load with weights_only=True).
store.load_memory imports a directory in this layout.
"""

import contextlib
import os

import torch

from configurator import UserError
from memory import Memory, check_stored, model_identity
from tokenizer import encode


def import_reference(path: str, model, enc) -> Memory:
    """Read the reference code's saved layout (docs/method.md section 5): keyStore/<layer>/<head>.pt
    and valueStore/<layer>/<head>.pt, row 0 a sentinel. Only tensors are read
    (torch.load with weights_only=True); the .faiss files are not needed, since an exact
    flat index is rebuilt from the keys."""
    cfg = model.config
    if cfg.arch != 'gpt2':
        raise UserError(f"{path} is in the reference code's layout, which holds GPT-2 memories; "
                        f"this model is {cfg.arch}: build its memory with build_memory.py")
    head_size = cfg.head_dim
    layer_dirs = sorted(int(n) for n in os.listdir(os.path.join(path, 'keyStore')) if n.isdigit())
    if not layer_dirs:
        raise UserError(f"{path}/keyStore holds no layer folders; it is not a reference memory")
    keys, values = {}, {}
    for l in layer_dirs:
        if l >= cfg.n_layer:
            raise UserError(f"{path} has a memory for layer {l}, this model has {cfg.n_layer} layers; "
                            f"it was made by another model")
        for store in ('keyStore', 'valueStore'):
            folder = os.path.join(path, store, str(l))
            heads = sorted(f for f in os.listdir(folder) if f.endswith('.pt')) if os.path.isdir(folder) else []
            if heads != sorted(f'{h}.pt' for h in range(cfg.n_head)):
                raise UserError(f"{folder} holds {len(heads)} head files, this model has {cfg.n_head} heads "
                                f"(0.pt .. {cfg.n_head - 1}.pt); the memory was made by another model")
        ks, vs = [], []
        for h in range(cfg.n_head):
            pair = []
            for store in ('keyStore', 'valueStore'):
                f = os.path.join(path, store, str(l), f'{h}.pt')
                try:
                    t = torch.load(f, map_location='cpu', weights_only=True)
                except Exception as e:
                    raise UserError(f"{f} is not a tensor file torch can read safely ({type(e).__name__}); "
                                    f"the memory is corrupted") from None
                if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.size(1) != head_size or t.size(0) < 2:
                    raise UserError(f"{f} holds {getattr(t, 'shape', type(t).__name__)}, expected (N+1, {head_size}); "
                                    f"it was made by another model")
                pair.append(t[1:].float())  # drop the sentinel row
            if pair[0].shape != pair[1].shape:
                raise UserError(f"{path} layer {l} head {h}: {pair[0].size(0)} stored keys but {pair[1].size(0)} "
                                f"values; the memory is corrupted")
            ks.append(pair[0])
            vs.append(pair[1])
        if len({k.size(0) for k in ks}) > 1:
            raise UserError(f"{path} layer {l}: its heads store different numbers of tokens "
                            f"({sorted({k.size(0) for k in ks})}); the memory is corrupted")
        keys[l], values[l] = torch.stack(ks), torch.stack(vs)
        if keys[l].size(1) != keys[min(keys)].size(1):
            raise UserError(f"{path}: layer {l} stores {keys[l].size(1)} tokens, layer {min(keys)} "
                            f"{keys[min(keys)].size(1)}; the memory is corrupted")
        check_stored(keys[l], values[l], f"{path} layer {l}", "the memory is corrupted")
    name = os.path.basename(os.path.normpath(path))
    text_file = os.path.join(path, f'{name}.txt')
    try:
        with open(text_file, encoding='utf-8') if os.path.isfile(text_file) else contextlib.nullcontext() as f:
            text = f.read() if f else None
    except UnicodeDecodeError:
        raise UserError(f"{text_file} is not UTF-8 text; the reference-layout memory's text file is damaged "
                        f"(its tensors alone are read if the file is removed)") from None
    ident = model_identity(model)
    ident['fingerprint'] = None  # the reference recorded none
    ids = encode(enc, text) if text else None
    n = next(iter(keys.values())).size(1)
    meta = dict(model=ident, text=text, token_windows=[ids] if ids else None, bookkeeping_token='\n',
                remove_bookkeeping_token_mem_size=len(ids) - n if ids and len(ids) >= n else None,
                retrieval_during_build=None, source=f'imported from reference layout {os.path.abspath(path)}')
    return Memory(keys, values, meta)
