"""
A run's config keys, their defaults and meanings: what sample.py, sweep.py and the inspection
scripts take. Kept apart from run.py, and free of torch and FAISS, so that a script's --help
answers at once instead of after seconds of imports.
"""

# a run's config keys, shared by sample.py and sweep.py: the reference code's sample.py keys
# (same names, same meaning) plus a few of ours (seeds, search, decoding, bookkeeping_token)
RUN_DEFAULTS = dict(
    init_from='gpt2',      # a checkpoint directory, a hub id (owner/name[@revision]; 'gpt2'...'gpt2-xl' are
                           # openai-community's), a .gguf file or 'smollm2-135m'
    start='\n',            # the prompt, or "FILE:prompt.txt"
    num_samples=3,         # number of samples to draw (when seeds is not given)
    max_new_tokens=50,     # tokens generated per sample
    temperature=0.8,       # 1.0 = no change, < 1.0 = less random
    top_k=200,             # keep only the top_k most likely tokens
    seed=1337,             # sample i uses seed + i, unless seeds is given
    seeds=None,            # a list of seeds, one sample each, or a count n (seed, ..., seed+n-1); overrides num_samples
    device='cpu',          # 'cpu', 'cuda', 'cuda:1', ...
    dtype='float32',       # 'float32', 'bfloat16' or 'float16'
    compile=False,         # accepted for the reference's configs; has no effect here
    out_dir='out',         # accepted for the reference's configs; has no effect here
    # --- the memory (docs/method.md) ---
    knn_num=None,          # k per layer, one entry per layer (0 = no memory in that layer); None = all 0
    memory='',             # the memory text, tokenized as given (starts with its bookkeeping token), or "FILE:path"
    bookkeeping_token='\n',  # put in front of a memory read from a file
    remove_bookkeeping_token_mem_size=None,  # leading memory tokens not stored; None = the bookkeeping token's length
    memory_keys='unrotated',  # RoPE models: store keys before RoPE ('unrotated') or as attention sees them ('rotated')
    mem_store='',          # a saved memory directory (ours, or the reference's layout)
    load_mem_store=False,  # load the memory from mem_store instead of building it from `memory`
    store_mem=False,       # save the memory built from `memory` to mem_store
    mmap=False,            # a loaded memory's values stay on disk, memory-mapped: only retrieved rows are read
    trust_saved_index=False,  # read a loaded memory's saved FAISS index files though this machine did not write them
    mem_frac=0.0,          # MF: tokens whose last-row attention is >= 1/(MF*T) look up the memory; 0 = token 0 only
    bookkeeping_frac=0.0,  # BF: token 0 looks up the memory only if its attention is > BF
    knn_softmax_influence=1.0,  # TS: scales q.key before the softmax over candidates
    resid_only=False,      # True: the token's own key/value is not a candidate
    resid_frac=0.0,        # r: v' = (1-r) m + r v; 0 = v' = m
    memory_mode='values',  # 'values' (the write-up's: mixed into selected values) or 'attention' (retrieval attention, docs/method.md section 10)
    memory_sim_threshold=None,  # memory_mode='attention': stored rows whose cosine with the query is at or below this get no weight
    decoding='exact',      # 'exact' (the method) or 'cached' (approximate, cost per token independent of context)
    exit_layer=None,       # sample from exit i = head(h_i), h_i after the first i blocks (1..n_layer); None = the output
    contrast_layers=None,  # [U, L]: sample from exit U auto-contrasted with exit L (docs/method.md section 6); None = off
    contrast_alpha=0.1,    # the contrast's threshold: tokens with p_U >= alpha * max p_U are re-weighted
    search=None,           # kNN search: 'faiss' or 'torch' (exact, on the model's device); None = faiss on CPU, torch on CUDA
    knn_index='',          # FAISS index: 'flat' (exact), 'hnsw', 'ivf', 'ivfsq', 'ivfpq', 'ivfpqfs' or a factory string; '' = the memory's own
    nprobe=None,           # IVF indexes: lists visited per search (None: calibrated when the index was built)
    ef_search=None,        # HNSW indexes: efSearch, the candidate list's length (None: calibrated when the index was built)
    method_text='No Memory',  # label of the method's samples (sample.py) or of a sweep's one memory setting
)
