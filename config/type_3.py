"""Sentiment direction, Type 3 method, the settings of Table 1 in the write-up.

Memory: the positive cats text (data/cats.txt) with a bookkeeping token in front, stored
for layers 6, 7, 8 (0-based; "7, 8, 9" in the write-up) and built retrieval-off.
"""
init_from = 'gpt2'
knn_num = [0, 0, 0, 0, 0, 0, 5, 5, 5, 0, 0, 0]  # k per layer
memory = "FILE:data/cats.txt"  # the bookkeeping token "\n" is put in front
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1  # do not store the bookkeeping token (section 2.2.2)
mem_frac = 5                 # MF
bookkeeping_frac = 0.9       # BF
knn_softmax_influence = 0.01  # TS
resid_only = False
resid_frac = 0.33            # r
start = "\nCats are horrible"
seeds = [1337, 2658, 8932, 2179, 9671]  # the seeds of Table 1
max_new_tokens = 50
unadulterated_gpt = True
method_text = "Type 3 method (Table 1)"
