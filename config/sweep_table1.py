"""Table 1 and the headline of the write-up: sentiment, Type 3 method, 100 seeds x 100 tokens.

    python sweep.py config/sweep_table1.py          # -> out/table1/

Memory: the positive cats text (data/cats.txt) with the bookkeeping token in front, which
is not stored (section 2.2.2); k 5 at layers 6, 7, 8 (0-based; "7, 8, 9" in the write-up);
BF 0.9, MF 5, TS 0.01, r 0.33. Baselines: plain GPT-2 (the write-up's "unadulterated
GPT-2": compound median -0.13, IQR 1.6) and the cats text in the context before the prompt
("GPT-2 + context"). The method reported median 0.99, IQR 0.01.
"""
init_from = 'gpt2'
start = "\nCats are horrible"
memory = "FILE:data/cats.txt"      # the bookkeeping token "\n" is put in front
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
knn_num = [0, 0, 0, 0, 0, 0, 5, 5, 5, 0, 0, 0]
mem_frac = 5.0                     # MF
bookkeeping_frac = 0.9             # BF
knn_softmax_influence = 0.01       # TS
resid_only = False
resid_frac = 0.33                  # r: Type 3
temperature = 0.8
top_k = 200
max_new_tokens = 100
seeds = 100                        # 1337, 1338, ..., 1436
metric = 'vader'
baselines = ['plain', 'context']
grid = {}                          # one memory setting: Table 1's
method_text = "Type 3 (Table 1)"   # its label in the summary and plots
