"""Figure 8 of the write-up: recall, Type 1 method, which layers.

    python sweep.py config/sweep_fig8.py            # -> out/fig8/

Fixed: BF 0.1, MF 1, TS 1, k 3; memory = the Vancouver paragraph (data/vancouver.txt) with
the bookkeeping token, not stored (section 2.2.2). Varied: the memory layers (0-based;
combinations ours). Baselines: the question alone (write-up: 15/100) and the paragraph in
the context before the question (53/100). Success: the continuation starts with
"Vancouver" (docs/sweeps.md has the exact rule).
"""


def knn(*layers, k=3):
    return [k if i in layers else 0 for i in range(12)]


init_from = 'gpt2'
start = "\nThe name of the city with the third-largest metropolitan area in Canada is"
memory = "FILE:data/vancouver.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
knn_num = knn(9)
mem_frac = 1.0
bookkeeping_frac = 0.1
knn_softmax_influence = 1.0
resid_only = False
resid_frac = 0.0                   # Type 1
max_new_tokens = 100
seeds = 100
metric = 'recall'
answers = ['Vancouver']
baselines = ['plain', 'context']
grid = {'knn_num': [knn(i) for i in range(12)] + [knn(8, 9), knn(9, 10), knn(8, 9, 10), knn(*range(6, 12))]}
