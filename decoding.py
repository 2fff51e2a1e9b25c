"""
Decoding, as gpt-fast names its phases: Decoder.prefill(prompt), then Decoder.step(token)
once per new token, each returning the next token's logits; generate() samples on top of it
with nanoGPT's semantics (temperature, top-k) and one random generator per row. Readout
chooses which logits are sampled from (an exit layer, or a contrast of two, docs/method.md
section 6).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from configurator import UserError
from transformer import LayerCache, Pass


class Decoder:
    """Decoding in two phases, as gpt-fast names them: prefill(prompt), then step(token) once per
    new token; each returns the next token's logits (B, V).

    mode='exact' (the default) is the method's decoding: a memory layer changes the values of
    past tokens, and its selection depends on the newest token, so every layer from the first
    memory layer on (the first rerun layer) is rerun over the whole sequence for each new
    token (docs/method.md section 2). Layers below it are unaffected and keep a KV cache; the first
    rerun layer's input never changes either, so it projects q, k, v for the new token only.

    mode='cached' is an approximation whose cost per token does not grow with the context:
    every layer keeps an ordinary KV cache, so past positions keep the states they had; a
    memory layer selects from the new token's attention row and attends with memory-updated
    values for the selected past tokens-heads (each computed once). The prefill is the same
    as in exact mode, and so is the first generated token.

    Once the sequence is longer than block_size the window slides: positions shift, so each
    step is a fresh prefill of the last block_size tokens.
    """

    def __init__(self, model, mode='exact', capacity=None, readout=None):
        if mode not in ('exact', 'cached'):
            raise ValueError(f"mode={mode!r}: use 'exact' or 'cached'")
        self.model, self.cached = model, mode == 'cached'
        n_layer, block_size = model.config.n_layer, model.config.block_size
        self.capacity = min(capacity or block_size, block_size)  # positions the caches are sized for
        self.readout = readout if readout is not None and not readout.is_plain(n_layer) else None
        # blocks above the highest exit read out feed nothing: they are not run
        self.top = self.readout.top() if self.readout else n_layer
        self.first_rerun_layer = n_layer if self.cached else min(model.memory_layers(changing_past=True), default=n_layer)
        self.first_rerun_layer = min(self.first_rerun_layer, self.top)
        self.tokens = None           # (B, T): every token so far
        self.caches = None           # KV caches of the layers below first_rerun_layer
        self.rerun_cache = None      # q, k, v of first_rerun_layer for the positions already seen
        self.hidden_at_rerun = None  # (B, T, C): hidden states entering first_rerun_layer

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Run the prompt idx (B, T) (its last block_size tokens) through the model."""
        self.tokens = idx
        window = idx[:, -self.model.config.block_size:]
        self.caches = self.model.new_cache(self.capacity)[:self.first_rerun_layer]
        self.rerun_cache = LayerCache(self.capacity)
        self.captured = dict.fromkeys(self.readout.layers()) if self.readout else None
        self.hidden_at_rerun, _, _ = self.model.run_blocks(self.model.embed(window), 0, self.first_rerun_layer,
                                                           caches=self.caches, capture=self.captured,
                                                           how=Pass(cached_memory=self.cached))
        return self._next_logits()

    def step(self, idx_next: torch.Tensor) -> torch.Tensor:
        """Add one token per row, idx_next (B, 1)."""
        self.tokens = torch.cat((self.tokens, idx_next), dim=1)
        T = self.tokens.size(1)
        if T > self.model.config.block_size:
            return self.prefill(self.tokens)
        new, _, _ = self.model.run_blocks(self.model.embed(idx_next, T - 1), 0, self.first_rerun_layer,
                                          caches=self.caches, pos_start=T - 1, capture=self.captured,
                                          how=Pass(cached_memory=self.cached))
        rerun = self.first_rerun_layer < self.top
        self.hidden_at_rerun = torch.cat((self.hidden_at_rerun, new), dim=1) if rerun else new
        return self._next_logits()

    def _next_logits(self):
        h = self.hidden_at_rerun
        if self.first_rerun_layer < self.top:
            h, _, _ = self.model.run_blocks(h, self.first_rerun_layer, self.top, rerun_cache=self.rerun_cache,
                                            last_only=True, capture=self.captured)
        if self.readout is None:
            return self.model.head(h[:, -1, :])
        return self.readout.logits({i: self.model.head(x) for i, x in self.captured.items()})


@dataclass(frozen=True)
class Readout:
    """Which logits decoding samples from (docs/method.md section 6; the shared-head mode of auto-contrastive-generation).
    Exit i's logits are head(h_i), h_i the residual stream after the first i blocks (1 <= i <=
    n_layer; i = n_layer is the ordinary output). exit_layer reads one exit; contrast_layers
    (U, L) reads log p of the auto-contrast of exit U against exit L with contrast_alpha.
    Neither set: the ordinary output. The memory acts inside the blocks either way."""
    exit_layer: int | None = None
    contrast_layers: tuple | None = None
    contrast_alpha: float = 0.1

    def check(self, n_layer: int) -> None:
        if self.exit_layer is not None and self.contrast_layers is not None:
            raise UserError("exit_layer and contrast_layers are alternatives: set one of them")
        if self.exit_layer is not None and not 1 <= self.exit_layer <= n_layer:
            raise UserError(f"exit_layer={self.exit_layer} must count blocks from 1 to {n_layer} (n_layer: the "
                            f"model's ordinary output)")
        if self.contrast_layers is not None:
            c = self.contrast_layers
            if len(c) != 2 or not all(isinstance(i, int) and 1 <= i <= n_layer for i in c) or c[1] > c[0]:
                raise UserError(f"contrast_layers={list(c)} must be [U, L], exits 1 <= L <= U <= {n_layer} "
                                f"(U the upper, L the lower)")
            if not 0 <= self.contrast_alpha <= 1:
                raise UserError(f"contrast_alpha={self.contrast_alpha} must be in [0, 1]")

    def is_plain(self, n_layer: int) -> bool:
        """True when this reads the ordinary output (nothing set, or exit_layer = n_layer)."""
        return self.contrast_layers is None and self.exit_layer in (None, n_layer)

    def describe(self) -> str:
        """'exit 20' or 'exit 30 contrasted with exit 20 (alpha 0.1)', for labels."""
        if self.exit_layer is not None:
            return f"exit {self.exit_layer}"
        upper, lower = self.contrast_layers
        return f"exit {upper} contrasted with exit {lower} (alpha {self.contrast_alpha})"

    def layers(self) -> list[int]:
        return [self.exit_layer] if self.exit_layer is not None else list(dict.fromkeys(self.contrast_layers))

    def top(self) -> int:
        return max(self.layers())

    def logits(self, exits: dict) -> torch.Tensor:
        """What sampling treats as the logits, from the exits' logits {i: (B, V)}."""
        if self.exit_layer is not None:
            return exits[self.exit_layer]
        upper, lower = self.contrast_layers
        return contrast(exits[upper], exits[lower], self.contrast_alpha)


def contrast(logits_upper: torch.Tensor, logits_lower: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Auto-contrastive log-probabilities (docs/method.md section 6): p_U, p_L = softmax; the tokens
    with p_U >= alpha * max(p_U) (the top one at least) share their total p_U in proportion to
    softmax(log p_U - log p_L) over them; the others keep p_U. Returns the log of that."""
    log_pu = F.log_softmax(logits_upper.float(), dim=-1)
    log_pl = F.log_softmax(logits_lower.float(), dim=-1)
    p_u = log_pu.exp()
    keep = p_u >= alpha * p_u.max(dim=-1, keepdim=True).values
    keep |= F.one_hot(p_u.argmax(dim=-1), p_u.size(-1)).bool()
    mass = (p_u * keep).sum(dim=-1, keepdim=True)
    shared = F.softmax((log_pu - log_pl).masked_fill(~keep, float('-inf')), dim=-1) * mass
    return torch.where(keep, shared, p_u).log()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One nanoGPT sampling step for logits (B, V): temperature, top-k, softmax, multinomial."""
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    probs = F.softmax(logits, dim=-1).cpu()
    if generators is None:
        return torch.multinomial(probs, num_samples=1)
    # one draw per row from the row's own generator; a draw is serial (the generator's
    # random stream) but rows are independent, so they run on several threads
    draw = lambda i: torch.multinomial(probs[i:i + 1], 1, generator=generators[i])
    if len(generators) > 1 and torch.get_num_threads() > 1:
        return torch.cat(list(_sampling_pool().map(draw, range(len(generators)))))
    return torch.cat([draw(i) for i in range(len(generators))])


_POOL = None


def _sampling_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix='sampling')
    return _POOL


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, *,
             generators: list[torch.Generator] | None = None, progress=None, mode: str = 'exact',
             readout: Readout | None = None) -> torch.Tensor:
    """Continue each row of idx (B, T) by max_new_tokens sampled tokens (nanoGPT semantics);
    model: a transformer.Transformer with its memory (if any) attached.

    generators: one torch.Generator per row (CPU), so row i draws exactly what a run of
    its own would; None uses torch's global generator (as nanoGPT). Sampling happens on
    the CPU, so a CUDA run draws the same tokens as a CPU run from the same probabilities.
    mode: 'exact' (the method) or 'cached' (an approximation); see Decoder. readout: which
    logits are sampled from (an exit layer or a contrast of two, docs/method.md section 6).
    """
    if idx.size(1) > model.config.block_size:
        warnings.warn(f"prompt of {idx.size(1)} tokens is longer than block_size {model.config.block_size}; "
                      f"only its last {model.config.block_size} tokens are used", stacklevel=2)
    decoder = Decoder(model, mode, capacity=idx.size(1) + max_new_tokens, readout=readout)
    logits = decoder.prefill(idx)
    for step in range(max_new_tokens):
        idx_next = sample_next(logits, temperature, top_k, generators).to(idx.device)
        idx = torch.cat((idx, idx_next), dim=1)
        if progress is not None:
            progress.update(1)
        if step < max_new_tokens - 1:
            logits = decoder.step(idx_next)
    return idx
