"""Sentiment direction, Type 1 method, the fixed settings of Figure 3d-f in the write-up:
layers 6-11 (0-based), BF 0, MF 5, TS 1, k 2, memory stored without a bookkeeping token
(section 2.2.1: the memory text has none, and nothing is removed)."""
init_from = 'gpt2'
knn_num = [0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2]
memory = "FILE:data/cats.txt"  # read from a file, with bookkeeping_token in front: here none
bookkeeping_token = ""
remove_bookkeeping_token_mem_size = 0
mem_frac = 5
bookkeeping_frac = 0.0
knn_softmax_influence = 1.0
resid_only = False
resid_frac = 0.0
start = "\nCats are horrible"
num_samples = 5
unadulterated_gpt = True
method_text = "Type 1 method (Figure 3d-f)"
