"""Figure 10 of the write-up: recall, Type 2 method (r 0.1), which layers.

    python sweep.py config/sweep_fig10.py           # -> out/fig10/

Fixed: BF 0.9, MF 5, TS 1000, k 5, resid_only, r 0.1; memory = the Vancouver paragraph
(data/vancouver.txt) with the bookkeeping token, not stored (section 2.2.2). Varied: the
memory layers (0-based; combinations ours; the write-up's best is layer 9, "layer 10").
Baselines: the question alone and the paragraph in the context before the question.
"""


def knn(*layers, k=5):
    return [k if i in layers else 0 for i in range(12)]


init_from = 'gpt2'
start = "\nThe name of the city with the third-largest metropolitan area in Canada is"
memory = "FILE:data/vancouver.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
knn_num = knn(9)
mem_frac = 5.0
bookkeeping_frac = 0.9
knn_softmax_influence = 1000.0
resid_only = True
resid_frac = 0.1                   # Type 2
max_new_tokens = 100
seeds = 100
metric = 'recall'
answers = ['Vancouver']
baselines = ['plain', 'context']
grid = {'knn_num': [knn(i) for i in range(12)] + [knn(8, 9), knn(9, 10), knn(8, 9, 10), knn(*range(6, 12))]}
