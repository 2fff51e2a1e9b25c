"""Storage of large memories: float16 stores (half the size, values rounded once), memory-mapped
values (only the rows retrieved are read), and both giving what the memory gives in RAM."""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import TINY, run_script
from memory import RetrievalSettings
from model import GPT
from run import Sampling, continuations, prompt_ids
from store import load_memory, save_memory

TYPE3 = RetrievalSettings([0, 3, 3, 0], 5.0, 0.1, 0.01, False, 0.33)


def build(tmp_path, name, *extra):
    text = os.path.join(ROOT, 'data', 'vancouver.txt')
    r = run_script('build_memory.py', text, f'--init_from={TINY}', f'--mem_store={tmp_path / name}', '--layers=[1,2]',
                   *extra)
    assert r.returncode == 0, r.stderr
    return str(tmp_path / name), r.stdout


def generate(model, enc, memory):
    _, ids = prompt_ids("\nThe name of the city is", enc)
    return continuations(model, ids, [1, 2, 3], Sampling(12, 0.8, 200, 'exact'), memory.retrieving_layers(TYPE3))


def test_float16_round_trip(tmp_path):
    model, enc = GPT.from_pretrained(TINY)
    full, _ = build(tmp_path, 'f32')
    half, out = build(tmp_path, 'f16', '--store_dtype=float16')
    assert 'in float16' in out and json.loads(open(os.path.join(half, 'memory.json')).read())['dtype'] == 'float16'
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith('.safetensors'))
    assert size(half) < 0.55 * size(full)
    m32, m16 = load_memory(full, model, enc), load_memory(half, model, enc)
    for layer in (1, 2):
        assert m16.values[layer].dtype == torch.float16
        assert torch.equal(m16.keys[layer], m32.keys[layer].half())  # rounded once, to the nearest float16
        assert torch.equal(m16.values[layer], m32.values[layer].half())
    assert m16.identity() != m32.identity()
    # saving again keeps float16, and the memory still retrieves and generates
    save_memory(m16, str(tmp_path / 'again'))
    assert load_memory(str(tmp_path / 'again'), model, enc).identity() == m16.identity()
    assert len(generate(model, enc, m16)) == 3


def file_mapping_holds(path, address):
    """True when address lies in a region of this process mapped from the file at path."""
    real = os.path.realpath(path)
    with open('/proc/self/maps') as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                lo, hi = (int(x, 16) for x in fields[0].split('-'))
                if lo <= address < hi:
                    return True
    return False


def test_memory_mapped_values_give_the_same_continuations(tmp_path):
    model, enc = GPT.from_pretrained(TINY)
    for dtype in ('float32', 'float16'):
        path, _ = build(tmp_path, dtype, f'--store_dtype={dtype}')
        in_ram, mapped = load_memory(path, model, enc), load_memory(path, model, enc, mmap=True)
        tensor_file = next(f for f in os.listdir(path) if f.endswith('.safetensors'))
        for layer in (1, 2):
            # the values' memory is a mapping of the tensor file (Linux: /proc/self/maps), not a copy
            assert file_mapping_holds(os.path.join(path, tensor_file), mapped.values[layer].data_ptr())
            assert torch.equal(mapped.values[layer], in_ram.values[layer])
        assert mapped.identity() == in_ram.identity()
        assert generate(model, enc, mapped) == generate(model, enc, in_ram)
    r = run_script('sample.py', f'--init_from={TINY}', '--load_mem_store=True', f'--mem_store={path}', '--mmap=True',
                   '--knn_num=[0,3,3,0]', '--seeds=[1]', '--max_new_tokens=3')
    assert r.returncode == 0, r.stderr
