"""Figure 7 of the write-up: sentiment, the three method types at layers 6, 7, 8.

    python sweep.py config/sweep_fig7.py            # -> out/fig7/

Fixed: k 5 at layers 6, 7, 8 (0-based), BF 1, TS 1; memory = cats text with the bookkeeping
token, not stored (section 2.2.2). Varied: the type (Type 1: resid_only False, r 0;
Type 2: resid_only True, r 0.1; Type 3: resid_only False, r 0.1) and MF (values ours).
To vary TS or k instead of MF, replace the 'mem_frac' entry of the grid.
"""
init_from = 'gpt2'
start = "\nCats are horrible"
memory = "FILE:data/cats.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
knn_num = [0, 0, 0, 0, 0, 0, 5, 5, 5, 0, 0, 0]
mem_frac = 5.0
bookkeeping_frac = 1.0
knn_softmax_influence = 1.0
max_new_tokens = 100
seeds = 100
metric = 'vader'
baselines = ['plain']
grid = {
    ('resid_only', 'resid_frac'): [(False, 0.0), (True, 0.1), (False, 0.1)],  # Type 1, 2, 3
    'mem_frac': [1.0, 5.0, 10.0],
}
