"""Figure 6 of the write-up: sentiment, Type 1 method, which layers.

    python sweep.py config/sweep_fig6.py            # -> out/fig6/

Fixed: BF 1, MF 5, TS 1, k 5; memory = cats text with the bookkeeping token, not stored
(section 2.2.2). Varied: the memory layers (0-based). The combinations are ours (every
single layer, then the write-up's 6-8 and 6-11, and all 12); change the grid to test others.
"""


def knn(*layers, k=5):
    """knn_num with k at the given layers (0-based) of GPT-2 small's 12."""
    return [k if i in layers else 0 for i in range(12)]


init_from = 'gpt2'
start = "\nCats are horrible"
memory = "FILE:data/cats.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
knn_num = knn(6, 7, 8)
mem_frac = 5.0
bookkeeping_frac = 1.0
knn_softmax_influence = 1.0
resid_only = False
resid_frac = 0.0                   # Type 1
max_new_tokens = 100
seeds = 100
metric = 'vader'
baselines = ['plain']
grid = {'knn_num': [knn(i) for i in range(12)] + [knn(6, 7, 8), knn(*range(6, 12)), knn(*range(12))]}
