"""
The run layer: what sample.py, sweep.py, build_memory.py and bench.py share. Scripts import
from here and never from each other.

  texts        the one rule for prompt and memory texts (FILE:path, the bookkeeping token,
               the sweep's substitute word)
  the model    load_pretrained (any init_from), load_model (with the config's device, dtype)
  a run        seeds_of (which seeds), Sampling (how tokens are drawn), MemorySource
               (where a memory comes from), prepare_memory, prepare_run (a Run: model,
               memory, retrieving layers, search settings, prompt), continuations
  output       append_jsonl (records that land whole)
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass

import torch

from build import build_from_text
from checkpoint import GGUF_PACKAGES, LLAMA_FAMILIES, family_of, gguf_path, llama_checkpoint
from configurator import REPOSITORY, UserError, configure
from decoding import Decoder, Readout, generate
from files import append_whole, read_text_file
from knn_index import SearchSettings
from llama import Llama
from memory import MEMORY_KEYS, LayerMemory, Memory, RetrievalSettings
from model import GPT
from run_config import RUN_DEFAULTS
from store import load_memory, save_memory
from tokenizer import encode
from transformer import Transformer

MAX_SEEDS = 1_000_000  # one run's seeds; each is a row of a batch
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
DECODINGS = ('exact', 'cached')


# -----------------------------------------------------------------------------
# texts

def memory_text(memory: str, bookkeeping_token: str, substitute: str = '', substitute_target: str = '') -> str:
    """The memory text as the memory stores it. The `memory` config key is tokenized as given
    (it starts with its bookkeeping token, as in the reference's configs); "FILE:path" reads
    the file and puts the bookkeeping token in front (docs/method.md section 1). Then, for the
    sweeps' Figure 13, every substitute_target becomes substitute."""
    text = bookkeeping_token + read_text_file(memory[5:], 'memory') if memory.startswith('FILE:') else memory
    if substitute:
        if not substitute_target or substitute_target not in text:
            raise UserError(f"substitute={substitute!r} replaces {substitute_target!r}, which the memory text "
                            f"does not contain; set substitute_target to a word of the memory")
        text = text.replace(substitute_target, substitute)
    return text


def prompt_text(start: str) -> str:
    """The prompt: the `start` config key as given, or the file it names with "FILE:path"."""
    return read_text_file(start[5:], 'prompt') if start.startswith('FILE:') else start


def prompt_ids(start: str, enc, block_size: int | None = None) -> tuple[str, list[int]]:
    """(text, token ids) of the prompt; with block_size, only its last block_size tokens are kept
    (the model sees no more, as in the reference's generate), with a warning."""
    text = prompt_text(start)
    ids = encode(enc, text)
    if not ids:
        raise UserError("the prompt is empty; set start=... (the model needs at least one token)")
    if block_size is not None and len(ids) > block_size:
        warnings.warn(f"prompt of {len(ids)} tokens is longer than block_size {block_size}; "
                      f"only its last {block_size} tokens are used", stacklevel=2)
        ids = ids[-block_size:]
    return text, ids


# -----------------------------------------------------------------------------
# the model

def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ('cpu', 'cuda'):
        raise UserError(f"device={device!r} is not a device this code runs on; use 'cpu', 'cuda' or 'cuda:N'")
    if kind == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device={device} but CUDA is not available here; use --device=cpu")


def load_pretrained(init_from: str) -> tuple[Transformer, object]:
    """(model, tokenizer) for init_from: a GGUF file or a short name of one (llama.GGUF_PACKAGES,
    e.g. 'smollm2-135m'), a directory in the Hugging Face layout, a GPT-2 name or a hub id.
    config.json's model_type decides between GPT-2 and the Llama family."""
    family = family_of(init_from)
    if family == 'gguf':
        return Llama.from_gguf(gguf_path(init_from), name=init_from if init_from in GGUF_PACKAGES else None)
    if family in LLAMA_FAMILIES:
        return Llama.from_pretrained(llama_checkpoint(init_from), name=None if os.path.isdir(init_from) else init_from)
    return GPT.from_pretrained(init_from)


def load_model(config: dict) -> tuple[Transformer, object]:
    """(model, tokenizer) for config's init_from, on its device, in its dtype."""
    device = config['device']
    check_device(device)
    if config['dtype'] not in DTYPES:
        raise UserError(f"dtype={config['dtype']!r} must be one of {', '.join(DTYPES)}")
    model, enc = load_pretrained(config['init_from'])
    return model.to(device=device, dtype=DTYPES[config['dtype']]), enc


# -----------------------------------------------------------------------------
# a run

def seeds_of(config: dict) -> list[int]:
    """The run's seeds: `seeds` as a list, or a count n meaning seed, seed+1, ..., seed+n-1;
    with seeds None, num_samples seeds counted the same way."""
    seeds, count = config['seeds'], None
    if seeds is None:
        count, what = config['num_samples'], 'num_samples'
    elif isinstance(seeds, int) and not isinstance(seeds, bool):
        count, what = seeds, 'seeds'
    if count is not None:
        if not 1 <= count <= MAX_SEEDS:
            raise UserError(f"{what}={count} must be a count from 1 to {MAX_SEEDS}")
        seeds = [config['seed'] + i for i in range(count)]
    if not isinstance(seeds, (list, tuple)) or not seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 63 for s in seeds):
        raise UserError(f"seeds={config['seeds']!r} (seed={config['seed']}) must be a count or a non-empty list of "
                        f"whole numbers from 0 to 2**63 - 1")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds={seeds!r} repeats a seed")
    return list(seeds)


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn (docs/method.md section 3) and decoded."""
    max_new_tokens: int
    temperature: float
    top_k: int | None
    decoding: str  # 'exact' (the method) or 'cached' (approximate)

    @classmethod
    def from_config(cls, config: dict, where: str | None = None) -> Sampling:
        """The config's sampling settings, checked; `where` names the setting in the message."""
        at = f"{where}: " if where else ''
        if config['max_new_tokens'] < 1 or not (math.isfinite(config['temperature']) and config['temperature'] >= 1e-4) \
                or (config['top_k'] is not None and config['top_k'] < 1):
            raise UserError(f"{at}max_new_tokens and top_k must be >= 1 and temperature a finite number >= 1e-4 "
                            f"(below it the logits overflow; top_k=1 samples greedily) "
                            f"(max_new_tokens={config['max_new_tokens']}, top_k={config['top_k']}, "
                            f"temperature={config['temperature']})")
        if config['decoding'] not in DECODINGS:
            raise UserError(f"{at}decoding={config['decoding']!r} must be 'exact' or 'cached'")
        return cls(config['max_new_tokens'], config['temperature'], config['top_k'], config['decoding'])


@dataclass(frozen=True)
class MemorySource:
    """Where a run's memory comes from: a text built on the fly (`text`, bookkeeping token in
    front) or a saved directory (`store`)."""
    text: str | None
    store: str | None
    bookkeeping_token: str
    remove_bookkeeping_token_mem_size: int | None
    memory_keys: str = 'unrotated'

    @classmethod
    def from_config(cls, config: dict, substitute: str = '', substitute_target: str = '') -> MemorySource:
        n_skip = config['remove_bookkeeping_token_mem_size']
        if n_skip is not None and (not isinstance(n_skip, int) or isinstance(n_skip, bool) or n_skip < 0):
            raise UserError(f"remove_bookkeeping_token_mem_size={n_skip!r} must be a whole number >= 0, or None "
                            f"(the bookkeeping token's length)")
        if config['memory_keys'] not in MEMORY_KEYS:
            raise UserError(f"memory_keys={config['memory_keys']!r} must be one of {', '.join(map(repr, MEMORY_KEYS))}")
        if config['load_mem_store']:
            if not config['mem_store']:
                raise UserError("load_mem_store=True needs mem_store=DIR (a memory made by build_memory.py)")
            return cls(None, config['mem_store'], config['bookkeeping_token'],
                       config['remove_bookkeeping_token_mem_size'], config['memory_keys'])
        text = memory_text(config['memory'], config['bookkeeping_token'], substitute, substitute_target)
        if not text.strip():
            raise UserError("knn_num turns the memory on but the memory text is empty; set memory=... "
                            "(or memory=FILE:path), or load_mem_store=True with mem_store=DIR")
        return cls(text, None, config['bookkeeping_token'], config['remove_bookkeeping_token_mem_size'],
                   config['memory_keys'])

    def load(self, model: Transformer, enc, layers: list[int], progress: bool = False, mmap: bool = False,
             trust_saved_index: bool = False) -> Memory:
        """The memory: loaded from `store` (refused if its keys are not in the memory_keys form
        asked for), or built from `text` for `layers`."""
        if self.store is not None:
            memory = load_memory(self.store, model, enc, mmap=mmap, trust_saved_index=trust_saved_index)
            if model.rope is not None and memory.memory_keys != self.memory_keys:
                raise UserError(f"{self.store} stores {memory.memory_keys} keys, the run asks for "
                                f"memory_keys={self.memory_keys!r}; set memory_keys={memory.memory_keys!r} or rebuild it")
            return memory
        return build_from_text(model, enc, self.text, layers=layers, bookkeeping_token=self.bookkeeping_token,
                            remove_bookkeeping_token_mem_size=self.remove_bookkeeping_token_mem_size,
                               progress=progress,
                               memory_keys=self.memory_keys if model.rope is not None else 'unrotated')

    def as_dict(self) -> dict:
        return asdict(self)


def prepare_memory(config: dict, model: Transformer, enc, settings: RetrievalSettings,
                   progress: bool = True) -> Memory | None:
    """The memory a sample.py config asks for (None when no layer retrieves); built from the
    config's text and saved to mem_store with store_mem=True, or loaded from mem_store."""
    if not settings.layers:
        return None
    if config['store_mem'] and not config['mem_store']:
        raise UserError("store_mem=True needs mem_store=DIR to save the memory to")
    memory = MemorySource.from_config(config).load(model, enc, settings.layers, progress=progress, mmap=config['mmap'],
                                                   trust_saved_index=config['trust_saved_index'])
    if config['store_mem'] and not config['load_mem_store']:
        save_memory(memory, config['mem_store'])
    return memory


def readout_of(config: dict) -> Readout | None:
    """The config's exit layer or contrast (docs/method.md section 6), or None for the ordinary output;
    checked against the model in continuations."""
    exit_layer, contrast, alpha = config['exit_layer'], config['contrast_layers'], config['contrast_alpha']
    if exit_layer is None and contrast is None:
        return None
    if exit_layer is not None and (not isinstance(exit_layer, int) or isinstance(exit_layer, bool)):
        raise UserError(f"exit_layer={exit_layer!r} must be a whole number of blocks, 1..n_layer")
    if contrast is not None and not isinstance(contrast, (list, tuple)):
        raise UserError(f"contrast_layers={contrast!r} must be [U, L], two exits counted from 1")
    return Readout(exit_layer, tuple(contrast) if contrast is not None else None, float(alpha))


@dataclass
class Run:
    """What a run of sample.py or an inspection script works with, made from a config."""
    model: Transformer
    enc: object
    settings: RetrievalSettings
    memory: Memory | None
    retrieval: dict[int, LayerMemory] | None  # the memory's retrieving layers (None: no memory)
    search: SearchSettings                     # how the memory is searched
    start: str                                 # the prompt text
    ids: list[int]                             # its tokens (the last block_size)


def prepare_run(config: dict, progress: bool = True) -> Run:
    """The model, the memory and its retrieving layers, and the prompt of a sample.py config."""
    search = SearchSettings.from_config(config)
    model, enc = load_model(config)
    settings = RetrievalSettings.from_config(config, model.config.n_layer)
    memory = prepare_memory(config, model, enc, settings, progress=progress)
    retrieval = memory.retrieving_layers(settings, config['device'], search) if memory else None
    start, ids = prompt_ids(config['start'], enc, model.config.block_size)
    return Run(model, enc, settings, memory, retrieval, search, start, ids)


def settings_of(config_file: str, n_layer: int) -> RetrievalSettings:
    """The retrieval settings of a run config file, for a model of n_layer layers (the
    benchmarks take Table 1's from config/type_3.py)."""
    path = config_file if os.path.isabs(config_file) else os.path.join(REPOSITORY, config_file)
    return RetrievalSettings.from_config(configure(RUN_DEFAULTS, [path]), n_layer)


def plain_and_memory(model: Transformer, fn, retrieval: dict[int, LayerMemory] | None) -> dict:
    """{'plain': fn(), 'memory': fn()}: fn run on the plain model, then with the memory attached
    (left out when there is none). For the inspection scripts' side-by-side views."""
    out = {}
    for variant, layers in (('plain', None), ('memory', retrieval)):
        if variant == 'memory' and layers is None:
            continue
        model.attach_memory(layers)
        try:
            out[variant] = fn()
        finally:
            model.attach_memory(None)
    return out


def continuations(model: Transformer, ids: list[int], seeds: list[int], sampling: Sampling,
                  retrieval: dict[int, LayerMemory] | None = None, progress=None, steering=None,
                  readout: Readout | None = None) -> list[list[int]]:
    """Continuations (token id lists) of prompt `ids`, one per seed, all seeds as one batch:
    row i draws with its own generator seeded with seeds[i], so it is exactly what a run with
    that seed alone gives. retrieval: the memory's retrieving layers (None: the plain model).
    steering: an actadd.Steering (activation addition), or None. readout: an exit layer or a
    contrast to sample from (decoding.Readout), or None."""
    if steering is not None:
        steering.check_prompt(len(ids))
    if readout is not None:
        readout.check(model.config.n_layer)
    model.attach_memory(retrieval)
    model.steering = steering
    try:
        device = next(model.parameters()).device
        x = torch.tensor([ids] * len(seeds), dtype=torch.long, device=device)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        y = generate(model, x, sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                     generators=gens, progress=progress, mode=sampling.decoding, readout=readout)
    finally:
        model.attach_memory(None)
        model.steering = None
    return [row[len(ids):].tolist() for row in y]


def answer_tokens(enc, text: str, ids: list[int], answer: str) -> list[int]:
    """The tokens of ' ' + answer as a continuation of the prompt (text, tokenized as ids): the
    tail of the tokenized whole where the prompt's tokens are its start, else the answer alone."""
    whole = encode(enc, text + ' ' + answer)
    if whole[:len(ids)] == ids and len(whole) > len(ids):
        return whole[len(ids):]
    alone = encode(enc, ' ' + answer)
    return alone[1:] if getattr(enc, 'bos_id', None) is not None and alone[:1] == [enc.bos_id] else alone


def answer_scores(model: Transformer, enc, text: str, ids: list[int], answers: list[str], decoding: str = 'exact',
                  retrieval: dict[int, LayerMemory] | None = None, steering=None,
                  readout: Readout | None = None) -> dict:
    """Recall by answer probability, teacher-forced: for each accepted answer, log p of its tokens
    (' ' + answer) after the prompt, fed one by one through decoding's phases with the memory
    (or steering, or readout) acting exactly as in generation, at temperature 1 and no top-k.
    One batched pass per prompt instead of sampled continuations. Returns the best answer, its
    log-probability and probability, whether its first token is the most likely next token,
    and every answer's log-probability."""
    toks = [answer_tokens(enc, text, ids, a) for a in answers]
    if not answers or not all(toks):
        raise UserError(f"answers={answers!r}: an answer with no tokens cannot be scored")
    model.attach_memory(retrieval)
    model.steering = steering
    try:
        device = next(model.parameters()).device
        n = max(len(t) for t in toks)
        dec = Decoder(model, decoding, capacity=len(ids) + n, readout=readout)
        logits = dec.prefill(torch.tensor([ids] * len(toks), dtype=torch.long, device=device))
        first = logits.argmax(-1).tolist()
        total = torch.zeros(len(toks), dtype=torch.float64)
        for t in range(n):
            step = torch.tensor([a[min(t, len(a) - 1)] for a in toks], dtype=torch.long, device=device)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(1, step[:, None]).squeeze(1).double().cpu()
            total += torch.tensor([t < len(a) for a in toks], dtype=torch.float64) * logp
            if t < n - 1:
                logits = dec.step(step[:, None])
    finally:
        model.attach_memory(None)
        model.steering = None
    best = int(total.argmax())
    return dict(answer=answers[best], answer_logprob=float(total[best]), answer_prob=math.exp(float(total[best])),
                answer_top1=int(first[best] == toks[best][0]), answer_logprobs=[float(v) for v in total])


# -----------------------------------------------------------------------------
# output

def append_jsonl(path: str, records: list[dict]) -> None:
    """Append records as JSON lines; they land whole or not at all (files.append_whole)."""
    append_whole(path, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records))
