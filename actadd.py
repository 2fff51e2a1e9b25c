"""
Activation addition (ActAdd; Turner et al. 2023), the steering method the memory is compared
with (docs/method.md section 9). Nothing is stored and nothing is retrieved: a prompt pair
(p+, p-), e.g. ("Love", "Hate"), run through the plain model gives the residual streams h+
and h- entering block `layer`; while generating, c * (h+ - h-) is added to the residual
stream entering that block at the sequence's first n positions, and nowhere else.

    steering = ActAdd(('Love', 'Hate'), layer=6, coeff=5.0).steering(model, enc)
    model.steering = steering          # Transformer.run_blocks adds it; None turns it off
"""

from dataclasses import asdict, dataclass

import torch

from configurator import UserError
from tokenizer import encode


@dataclass(frozen=True)
class ActAdd:
    """The prompt pair, the block whose incoming residual stream is steered (0-based) and c."""
    prompts: tuple
    layer: int
    coeff: float

    @classmethod
    def from_config(cls, config, where=None):
        at = f"{where}: " if where else ''
        prompts = config['actadd_prompts']
        if not isinstance(prompts, (list, tuple)) or len(prompts) != 2 or \
                not all(isinstance(p, str) and p for p in prompts):
            raise UserError(f"{at}actadd_prompts={prompts!r} must be two non-empty strings (p+, p-), "
                            f"e.g. ['Love', 'Hate']")
        if config['actadd_layer'] < 0:
            raise UserError(f"{at}actadd_layer={config['actadd_layer']} must be a block index >= 0")
        return cls(tuple(prompts), config['actadd_layer'], float(config['actadd_coeff']))

    def as_dict(self):
        return dict(asdict(self), prompts=list(self.prompts))

    @torch.no_grad()
    def steering(self, model, enc):
        """The Steering that adds c * (h+ - h-) for this model: both prompts tokenized, the
        shorter padded at its end with the token of a single space, run through the plain
        model up to block `layer`."""
        n_layer = model.config.n_layer
        if self.layer >= n_layer:
            raise UserError(f"actadd_layer={self.layer} but the model has blocks 0..{n_layer - 1}")
        ids = [encode(enc, p) for p in self.prompts]
        space = encode(enc, ' ')
        if len(space) != 1:
            raise UserError(f"the tokenizer encodes a single space as {len(space)} tokens; ActAdd pads with one token")
        n = max(map(len, ids))
        ids = [i + space * (n - len(i)) for i in ids]
        device = next(model.parameters()).device
        x = model.embed(torch.tensor(ids, dtype=torch.long, device=device))
        saved, memory = model.steering, {i: b.attn.memory for i, b in enumerate(model.blocks)}
        model.steering = None
        model.attach_memory(None)  # h+ and h- come from the plain model
        try:
            h, _, _ = model.run_blocks(x, 0, self.layer)
        finally:
            model.steering = saved
            model.attach_memory({i: m for i, m in memory.items() if m is not None})
        return Steering(self.layer, self.coeff * (h[0] - h[1]))


class Steering:
    """delta (n, C) added to the residual stream entering block `layer` at positions 0..n-1."""

    def __init__(self, layer, delta):
        self.layer, self.delta = layer, delta

    def add(self, x, pos_start):
        """x (B, T, C) holds positions pos_start .. pos_start+T-1; those below n get delta. Past
        positions never change, so a KV cache stays exact."""
        end = min(self.delta.size(0) - pos_start, x.size(1))
        if end <= 0:
            return x
        x = x.clone()
        x[:, :end] += self.delta[pos_start:pos_start + end].to(x.dtype)
        return x

    def check_prompt(self, n_prompt):
        if n_prompt < self.delta.size(0):
            raise UserError(f"ActAdd steers the first {self.delta.size(0)} positions but the prompt has {n_prompt} "
                            f"tokens; use a longer prompt or shorter actadd_prompts")
