"""Figure 3a of the write-up: sentiment, Type 1 method in all 12 layers, varying MF.

    python sweep.py config/sweep_fig3a.py           # -> out/fig3a/

Fixed: BF 0, TS 1, k 2 in every layer; memory stored without a bookkeeping token
(section 2.2.1: the cats text as it is, nothing removed). Varied: MF (mem_frac). The MF
values are ours (the write-up does not list them); MF 0 = only token 0 looks up the
memory. For Figures 3b/3c vary knn_softmax_influence or k instead, e.g.
    --grid="{'knn_softmax_influence': [0.01, 0.1, 1, 10, 100]}"
For 3d-f use layers 6-11: --knn_num=[0,0,0,0,0,0,2,2,2,2,2,2].
"""
init_from = 'gpt2'
start = "\nCats are horrible"
memory = "FILE:data/cats.txt"  # read from a file, with bookkeeping_token in front: here none
bookkeeping_token = ""
remove_bookkeeping_token_mem_size = 0
knn_num = [2] * 12
mem_frac = 5.0
bookkeeping_frac = 0.0
knn_softmax_influence = 1.0
resid_only = False
resid_frac = 0.0                   # Type 1
max_new_tokens = 100
seeds = 100
metric = 'vader'
baselines = ['plain']
grid = {'mem_frac': [0.0, 1.0, 2.0, 5.0, 10.0, 20.0]}
