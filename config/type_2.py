"""Recall, Type 2 method, the settings of Table 4 in the write-up.

Memory: the Vancouver paragraph (data/vancouver.txt) with a bookkeeping token in front,
stored for layer 9 (0-based; "layer 10" in the write-up).
"""
init_from = 'gpt2'
knn_num = [0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]
memory = "FILE:data/vancouver.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
mem_frac = 0.0               # MF 0: only token 0 (the bookkeeping token) may look up the memory
bookkeeping_frac = 0.9       # BF
knn_softmax_influence = 1000  # TS
resid_only = True
resid_frac = 0.1
start = "\nThe name of the city with the third-largest metropolitan area in Canada is"
num_samples = 5
unadulterated_gpt = True
method_text = "Type 2 method (Table 4)"
