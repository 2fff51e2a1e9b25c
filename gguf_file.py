"""
Reading a GGUF file (llama.cpp's format) of a Llama-family model: its metadata as LlamaConfig's
fields, its tensors dequantized to float32 under Hugging Face's names (llama.cpp's q/k row
order undone), and its own vocabulary and merges as the tokenizer. llama.py builds the model.
"""

import torch

from checkpoint import LLAMA_FAMILIES
from configurator import UserError
from tokenizer import HFTokenizer


class GGUFMeta:
    """A GGUF file's metadata: the model config and the tokenizer."""

    def __init__(self, reader, path):
        self.fields, self.path, self.reader = reader.fields, path, reader

    def get(self, key, default=None):
        import gguf
        f = self.fields.get(key)
        if f is None:
            return default
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode('utf-8') for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode('utf-8')
        return f.parts[f.data[0]].tolist()[0]

    def config(self) -> dict:
        """llama.LlamaConfig's fields."""
        arch = self.get('general.architecture')
        if arch not in LLAMA_FAMILIES:
            raise UserError(f"{self.path} holds a {arch!r} model; the Llama family here is {', '.join(LLAMA_FAMILIES)}")
        a = lambda key, default=None: self.get(f'{arch}.{key}', default)
        required = ('context_length', 'block_count', 'attention.head_count', 'embedding_length', 'feed_forward_length')
        missing = [f'{arch}.{k}' for k in required if a(k) is None]
        if missing:
            raise UserError(f"{self.path} lacks {', '.join(missing)}; the GGUF file is incomplete or damaged")
        n_head, n_embd = a('attention.head_count'), a('embedding_length')
        if not all(isinstance(v, int) and v >= 1 for v in (n_head, n_embd)):
            raise UserError(f"{self.path}: {arch}.attention.head_count={n_head!r} and {arch}.embedding_length={n_embd!r} "
                            f"must be whole numbers >= 1")
        tokens = self.get('tokenizer.ggml.tokens') or []
        names = {t.name for t in self.reader.tensors}
        number = lambda key, default: a(key, default) if isinstance(a(key, default), (int, float)) else float('nan')  # noqa: E731
        return dict(arch=arch, block_size=a('context_length'), vocab_size=a('vocab_size', len(tokens)),
                    n_layer=a('block_count'), n_head=n_head, n_kv_head=a('attention.head_count_kv', n_head),
                    n_embd=n_embd, head_dim=a('rope.dimension_count', n_embd // n_head),
                    intermediate_size=a('feed_forward_length'), rope_theta=float(number('rope.freq_base', 10000.0)),
                    rms_norm_eps=float(number('attention.layer_norm_rms_epsilon', 1e-6)),
                    attention_bias='blk.0.attn_q.bias' in names, o_proj_bias='blk.0.attn_output.bias' in names,
                    tie_word_embeddings='output.weight' not in names)

    def tokenizer(self):
        """Byte-level BPE from the file's tokens and merges (as transformers reads a GGUF file)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        kind = self.get('tokenizer.ggml.model')
        if kind != 'gpt2':
            raise UserError(f"{self.path}: its tokenizer is {kind!r}; only byte-level BPE ('gpt2') GGUF tokenizers "
                            f"are read here: use the model's Hugging Face directory with tokenizer.json instead")
        tokens, types = self.get('tokenizer.ggml.tokens'), self.get('tokenizer.ggml.token_type')
        merges = self.get('tokenizer.ggml.merges')
        if not tokens or not isinstance(merges, list) or len(set(tokens)) != len(tokens) or '' in tokens:
            raise UserError(f"{self.path}: its tokenizer lacks tokens or merges, or repeats or has empty tokens; "
                            f"the file is damaged")
        if types is not None and len(types) != len(tokens):
            raise UserError(f"{self.path}: {len(types)} token types for {len(tokens)} tokens; the file is damaged")
        pairs = [m.split(' ') for m in merges]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            raise UserError(f"{self.path}: a merge is not two tokens ({next(m for m, p in zip(merges, pairs) if len(p) != 2 or not all(p))!r}); "
                            f"the tokenizer is damaged")
        merges = [tuple(p) for p in pairs]
        bos = self.get('tokenizer.ggml.bos_token_id')
        if bos is not None and not (isinstance(bos, int) and 0 <= bos < len(tokens)):
            raise UserError(f"{self.path}: tokenizer.ggml.bos_token_id={bos!r} is not one of its {len(tokens)} tokens")
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(self.get('tokenizer.ggml.add_space_prefix')),
                                                     use_regex=True)
        tok.decoder = decoders.ByteLevel()
        CONTROL, USER_DEFINED = 3, 4
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types or []) if ty in (CONTROL, USER_DEFINED)])
        return HFTokenizer(tok, bos if self.get('tokenizer.ggml.add_bos_token') else None)


GGUF_BLOCK_NAMES = {'attn_norm': 'input_layernorm', 'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
                    'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
                    'ffn_norm': 'post_attention_layernorm', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
                    'ffn_down': 'mlp.down_proj'}
GGUF_TOP_NAMES = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm', 'output': 'lm_head'}


def gguf_to_hf_name(name):
    """llama.cpp's tensor name -> Hugging Face's (None for tensors the model does not use, e.g. rope_freqs)."""
    base, _, kind = name.rpartition('.')
    if base in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[base]}.{kind}"
    parts = base.split('.')
    if len(parts) == 3 and parts[0] == 'blk' and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{kind}"
    return None


def unpermute(w, n_head):
    """Undo llama.cpp's conversion, which interleaves each head's two rotary halves in q and k
    rows (for its own RoPE kernel): back to Hugging Face's rotate-half order."""
    return w.reshape(n_head, w.size(0) // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)



def read_gguf(path: str, check=None) -> tuple[dict, dict[str, torch.Tensor], HFTokenizer]:
    """(LlamaConfig fields, {Hugging Face name: float32 tensor}, tokenizer) of a GGUF file.
    check(fields, {name: shape}) runs on the metadata and the tensors' declared shapes before
    anything is dequantized (llama.LlamaConfig.check); a tensor with NaN or inf is refused."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = GGUFMeta(reader, path)
    config = meta.config()
    used = [(t, gguf_to_hf_name(t.name)) for t in reader.tensors if gguf_to_hf_name(t.name) is not None]
    if check is not None:
        check(config, {name: tuple(int(x) for x in reversed(t.shape.tolist())) for t, name in used})
    tokenizer = meta.tokenizer()
    tensors = {}
    for t, name_hf in used:
        try:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        except NotImplementedError:
            raise UserError(f"{path}: tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf "
                            f"package cannot dequantize") from None
        if config['arch'] in ('llama', 'mistral') and name_hf.endswith(('q_proj.weight', 'k_proj.weight')):
            w = unpermute(w, config['n_head'] if 'q_proj' in name_hf else config['n_kv_head'])
        if not torch.isfinite(w).all():
            raise UserError(f"{path}: tensor {t.name} holds NaN or infinite values; the file is damaged")
        tensors[name_hf] = w
    return config, tensors, tokenizer
