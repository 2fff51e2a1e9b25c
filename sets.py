"""
Item and prompt sets: what a sweep runs over instead of one `start` (docs/evaluation.md).

  a recall set   {"format": "recall-set", "documents": [{"id", "split", "text",
                  "questions": [{"question", "answers"}]}]}: each question is an item; its
                  document is its memory (or, with set_memory='all', every document is)
  a prompt set   {"format": "prompt-set", "prompts": [{"id", "split", "prompt"}]}: each prompt
                  is an item; the memory is the sweep's own
  a passkey set  {"format": "passkey-set", "filler", "sizes", "depths", "keys", "seed", "question"}:
                  a recall set made on the fly: for each size (in filler repetitions) and depth
                  (0 = start, 1 = end), a document of filler text with a five-digit key stated once

Splits are 'dev' (settings are tuned there) and 'test' (they are reported there). Items of one
document share its `unit`, the unit confidence intervals resample (set_report.py). Files are
checked whole before anything runs: size, JSON, ids unique, every field present and a string.
"""

import json
import os
from dataclasses import dataclass

from configurator import UserError

SPLITS = ('dev', 'test')
MAX_SET_BYTES = 50 << 20
SET_FORMATS = ('recall-set', 'prompt-set', 'passkey-set')
MAX_PASSKEY_REPEATS = 1_000_000  # filler repetitions of one passkey document


@dataclass(frozen=True)
class Item:
    """One item of a set: the prompt the model continues, its accepted answers (recall sets),
    the document it is about (recall sets; '' in prompt sets), its split and its unit."""
    id: str
    split: str
    prompt: str
    answers: tuple[str, ...]
    document: str
    unit: str
    kind: str = ''       # an optional subset the summary also reports apart (a prompt's tone, a passkey's size)


@dataclass(frozen=True)
class ItemSet:
    path: str
    kind: str            # 'recall-set' or 'prompt-set'
    items: tuple[Item, ...]

    def documents(self) -> list[str]:
        """Every document of a recall set once, in the file's order (set_memory='all')."""
        return list(dict.fromkeys(i.document for i in self.items if i.document))

    def of_split(self, split: str) -> list[Item]:
        return [i for i in self.items if split in ('both', i.split)]


def _text(obj, key, where):
    v = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{where}: {key!r} must be a non-empty string (got {v!r})")
    return v


def _split(obj, where):
    s = obj.get('split')
    if s not in SPLITS:
        raise UserError(f"{where}: split={s!r} must be one of {', '.join(map(repr, SPLITS))}")
    return s


def _kind(obj, where):
    k = obj.get('kind', '')
    if not isinstance(k, str):
        raise UserError(f"{where}: kind={k!r} must be a string")
    return k


def load_set(path: str) -> ItemSet:
    """The set in the JSON file at path, checked (a one-line error names what is wrong)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        raise UserError(f"set={path!r}: no such file (give a set file, e.g. data/recall_items.json)") from None
    if size > MAX_SET_BYTES:
        raise UserError(f"set={path!r} is {size} bytes, more than a set file may be ({MAX_SET_BYTES})")
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"set={path!r} is not a JSON file in UTF-8 ({e})") from None
    kind = data.get('format') if isinstance(data, dict) else None
    if kind not in SET_FORMATS:
        raise UserError(f"set={path!r}: 'format' must be one of {', '.join(map(repr, SET_FORMATS))} (got {kind!r})")
    items = []
    if kind == 'passkey-set':
        items = passkey_items(data, path)
        kind = 'recall-set'
    elif kind == 'recall-set':
        docs = data.get('documents')
        if not isinstance(docs, list) or not docs:
            raise UserError(f"set={path!r}: 'documents' must be a non-empty list")
        for n, d in enumerate(docs):
            where = f"set {path} document {n}"
            doc_id, split, text = _text(d, 'id', where), _split(d, where), _text(d, 'text', where)
            qs = d.get('questions')
            if not isinstance(qs, list) or not qs:
                raise UserError(f"{where} ({doc_id}): 'questions' must be a non-empty list")
            for j, q in enumerate(qs):
                w = f"{where} ({doc_id}) question {j}"
                answers = q.get('answers') if isinstance(q, dict) else None
                if not isinstance(answers, list) or not answers or \
                        not all(isinstance(a, str) and a.strip() for a in answers):
                    raise UserError(f"{w}: 'answers' must be a non-empty list of non-empty strings")
                items.append(Item(f"{doc_id}/{j}", split, _text(q, 'question', w), tuple(answers), text, doc_id,
                                  _kind(d, where)))
    else:
        prompts = data.get('prompts')
        if not isinstance(prompts, list) or not prompts:
            raise UserError(f"set={path!r}: 'prompts' must be a non-empty list")
        for n, p in enumerate(prompts):
            where = f"set {path} prompt {n}"
            pid = _text(p, 'id', where)
            items.append(Item(pid, _split(p, where), _text(p, 'prompt', where), (), '', pid, _kind(p, where)))
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"set={path!r}: the id {dup!r} is used twice; ids must be unique")
    return ItemSet(path, kind, tuple(items))


def passkey_items(data, path):
    """The items of a passkey set: for each of `keys` keys (five digits, drawn from `seed`), size
    and depth, a document of `size` repetitions of the filler with the key's sentence inserted
    after round(depth * size) of them, asked `question`. Split: the first key's items are dev."""
    import random
    where = f"set {path}"
    filler, question = _text(data, 'filler', where), _text(data, 'question', where)
    sizes, depths, keys, seed = data.get('sizes'), data.get('depths'), data.get('keys'), data.get('seed', 0)
    if not isinstance(sizes, list) or not sizes or \
            not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_PASSKEY_REPEATS for n in sizes):
        raise UserError(f"{where}: 'sizes' must be a list of filler repetitions from 1 to {MAX_PASSKEY_REPEATS}")
    if not isinstance(depths, list) or not depths or \
            not all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in depths):
        raise UserError(f"{where}: 'depths' must be a list of numbers from 0 (start) to 1 (end)")
    if not isinstance(keys, int) or isinstance(keys, bool) or not 1 <= keys <= 100 or not isinstance(seed, int):
        raise UserError(f"{where}: 'keys' must be a count from 1 to 100 and 'seed' a whole number")
    rng = random.Random(seed)
    items = []
    for k in range(keys):
        key = str(rng.randrange(10000, 100000))
        for n in sizes:
            for d in depths:
                at = round(d * n)
                text = ' '.join([filler] * at + [f"The pass key is {key}. Remember it. {key} is the pass key."] +
                                [filler] * (n - at))
                unit = f"key{k}-x{n}-d{d}"
                items.append(Item(unit, 'dev' if k == 0 else 'test', question, (key,), text, unit, f"{n} fillers"))
    return items
