"""Figure 13 of the write-up: recall of a substituted word, Type 2 method at layer 9.

    python sweep.py config/sweep_fig13.py           # -> out/fig13/

Every "Vancouver" of the paragraph (data/vancouver.txt) is replaced by the word of the
setting (sweep key `substitute`), in the memory and in the context baseline; the answer is
that word. Fixed: k 5 at layer 9 (0-based; "layer 10"), BF 0.9, MF 0, TS 1000,
resid_only, r 0.1 (Table 4's Type 2 settings). The words are ours. Baselines: the paragraph
in the context before the question, and the question alone (how often the word comes
without any help).
"""
init_from = 'gpt2'
start = "\nThe name of the city with the third-largest metropolitan area in Canada is"
memory = "FILE:data/vancouver.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
knn_num = [0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]
mem_frac = 0.0
bookkeeping_frac = 0.9
knn_softmax_influence = 1000.0
resid_only = True
resid_frac = 0.1                   # Type 2
max_new_tokens = 100
seeds = 100
metric = 'recall'
answers = None                     # the answer of each setting is its substitute word
substitute_target = 'Vancouver'
baselines = ['context', 'plain']
grid = {'substitute': ['Vancouver', 'Toronto', 'Montreal', 'Calgary', 'Ottawa', 'Seattle', 'London', 'Paris',
                       'Berlin', 'Tokyo', 'Springfield', 'Atlantis']}
