"""
Tokenizers: GPT-2's byte-level BPE through tiktoken (from a checkpoint's vocab.json and
merges.txt), and Hugging Face `tokenizers` tokenizers for the Llama family (tokenizer.json,
or a GGUF file's own vocabulary, see gguf_file.py). `encode` is the one way the project turns
text into ids, whichever tokenizer a model has.
"""

from __future__ import annotations

import json
import os

import tiktoken

from checkpoint import read_json
from configurator import UserError

EOT = '<|endoftext|>'
# GPT-2's pre-tokenisation pattern (the same one tiktoken's "gpt2" encoding uses)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder():
    """GPT-2's vocab.json spells bytes as printable characters; map them back to byte values."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def load_tokenizer(ckpt_dir: str) -> tiktoken.Encoding:
    """A tiktoken Encoding built from the checkpoint's vocab.json and merges.txt.

    In GPT-2's byte-level BPE a token's id is also its merge rank, which is exactly what
    tiktoken's mergeable_ranks are, so the vocabulary can be used as it is.
    """
    bad = lambda why: UserError(f"{ckpt_dir}: {why}; the tokenizer files are damaged (copy vocab.json and "  # noqa: E731
                                f"merges.txt of the checkpoint again)")
    try:
        with open(os.path.join(ckpt_dir, 'vocab.json'), encoding='utf-8') as f:
            vocab = json.load(f)
        with open(os.path.join(ckpt_dir, 'merges.txt'), encoding='utf-8') as f:
            lines = f.read().split('\n')[1:]
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise bad(f"vocab.json or merges.txt is not UTF-8 JSON / text ({type(e).__name__})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in vocab.values()):
        raise bad("vocab.json is not an object of token -> whole-number id")
    if len(set(vocab.values())) != len(vocab):
        raise bad("vocab.json gives two tokens the same id")
    decoder = _byte_decoder()
    if not set(decoder) <= set(vocab):
        raise bad(f"vocab.json lacks {len(set(decoder) - set(vocab))} of the 256 byte tokens a byte-level BPE needs")
    ranks, special = {}, {}
    for token, idx in vocab.items():
        if token == EOT:
            special[token] = idx
        elif not all(ch in decoder for ch in token):
            raise bad(f"vocab.json token {token[:20]!r} is not in GPT-2's byte alphabet")
        else:
            ranks[bytes(decoder[ch] for ch in token)] = idx
    # merges.txt must agree with the ids: the n-th merge makes token 256 + n
    merges = [line.split() for line in lines if line.strip()]
    broken = next((m for m in merges if len(m) != 2), None)
    if broken is not None:
        raise bad(f"merges.txt has a line that is not two tokens ({' '.join(broken)[:40]!r})")
    for n, (a, b) in enumerate(merges[:8]):
        if vocab.get(a + b) != 256 + n:
            raise UserError(f"{ckpt_dir}: merges.txt and vocab.json disagree at merge {n} ({a} {b}); "
                            f"the tokenizer files are not a GPT-2 byte-level BPE pair")
    name = 'gpt2-' + os.path.basename(os.path.normpath(ckpt_dir))
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def encode(enc, text: str) -> list[int]:
    """Token ids of text: GPT-2's tiktoken Encoding ('<|endoftext|>' allowed), or a tokenizer
    with its own encode (llama.HFTokenizer, which adds BOS where its configuration says so)."""
    if hasattr(enc, 'special_tokens_set'):
        return enc.encode(text, allowed_special={EOT} & enc.special_tokens_set)
    return enc.encode(text)



class HFTokenizer:
    """A `tokenizers` tokenizer with what the scripts use: encode (adding BOS only where the
    tokenizer's own configuration says so) and decode."""

    def __init__(self, tokenizer, bos_id=None):
        self.tokenizer, self.bos_id = tokenizer, bos_id
        self.n_vocab = tokenizer.get_vocab_size()

    def encode(self, text):
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return [self.bos_id] + ids if self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


MAX_TOKENIZER_BYTES = 256 << 20


def check_bpe_json(path):
    """A BPE tokenizer.json checked before `tokenizers` reads it, which accepts some damage
    silently (and then tokenizes differently): ids unique whole numbers, every merge two tokens
    of the vocabulary whose join is in it too, and, for a byte-level BPE, all 256 byte tokens."""
    size = os.path.getsize(path)
    if size > MAX_TOKENIZER_BYTES:
        raise UserError(f"{path} is {size} bytes, more than a tokenizer file may be ({MAX_TOKENIZER_BYTES})")
    data = read_json(path)
    model = data.get('model')
    if not isinstance(model, dict) or model.get('type') != 'BPE':
        return  # other models (Unigram, WordPiece) are left to the library
    vocab, merges = model.get('vocab'), model.get('merges')
    bad = lambda what: UserError(f"{path}: {what}; the tokenizer file is damaged")  # noqa: E731
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in vocab.values()):
        raise bad("the BPE vocab is not an object of token -> whole-number id")
    if len(set(vocab.values())) != len(vocab):
        raise bad("the BPE vocab gives two tokens the same id")
    for n, m in enumerate(merges if isinstance(merges, list) else [None]):
        pair = m.split(' ') if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(t, str) and t for t in pair):
            raise bad(f"merge {n} ({str(m)[:40]!r}) is not two tokens")
        if not all(t in vocab for t in pair) or ''.join(pair) not in vocab:
            raise bad(f"merge {n} ({' '.join(pair)[:40]!r}) joins tokens that are not all in the vocab")
    byte_level = 'ByteLevel' in json.dumps([data.get(k) for k in ('pre_tokenizer', 'decoder')])
    missing = len(set(_byte_decoder()) - set(vocab)) if byte_level and not model.get('byte_fallback') else 0
    if missing:
        raise bad(f"the byte-level BPE vocab lacks {missing} of the 256 byte tokens")


def load_hf_tokenizer(ckpt_dir):
    """tokenizer.json through the `tokenizers` library: its own pre-tokenizer, special tokens
    and post-processor; BOS added also where tokenizer_config.json says add_bos_token."""
    from tokenizers import Tokenizer
    path = os.path.join(ckpt_dir, 'tokenizer.json')
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir} lacks tokenizer.json, which Llama-family checkpoints here are read with")
    check_bpe_json(path)
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise UserError(f"{path} cannot be read as a tokenizer ({e})") from None
    bos_id = None
    cfg_path = os.path.join(ckpt_dir, 'tokenizer_config.json')
    if os.path.isfile(cfg_path):
        cfg = read_json(cfg_path)
        bos = cfg.get('bos_token')
        bos = bos.get('content') if isinstance(bos, dict) else bos
        if bos is not None and not isinstance(bos, str):
            raise UserError(f"{cfg_path}: bos_token={str(bos)[:40]} is not a token (a string); the file is damaged")
        if cfg.get('add_bos_token') and bos is not None:
            bos_id = tok.token_to_id(bos)
            if bos_id is None:
                raise UserError(f"{cfg_path}: bos_token {bos!r} is not in tokenizer.json's vocabulary")
    return HFTokenizer(tok, bos_id)

