"""tokenizer.py: GPT-2's BPE through tiktoken against transformers' tokenizer."""
import os

from conftest import TINY
from tokenizer import encode, load_tokenizer


def test_tokenizer_matches_transformers():
    from transformers import GPT2Tokenizer
    hf = GPT2Tokenizer(os.path.join(TINY, 'vocab.json'), os.path.join(TINY, 'merges.txt'))
    enc = load_tokenizer(TINY)
    for text in ["\nCats are horrible", "Hello world!  It's 2021, isn't it?\n\n\tTabs", "naïve café — ünïcödé 😀",
                 "the third-largest metropolitan area in Canada is", "   leading spaces", "x<|endoftext|>y"]:
        assert encode(enc, text) == hf.encode(text), text
        assert enc.decode(encode(enc, text)) == text
    assert enc.n_vocab == 474 and enc.eot_token == 473
