"""The encoder with a pooled classification head: [CLS] (or mean) pooling -> Dense(num_labels).

`Classifier` is a Decoder whose `hidden` pools the final hidden states to [B, 1, D] and whose `logits`
applies the head, so the trainer's own step and evaluation compute the classification cross-entropy with
targets [B, 1] (the label index) and weights [B, 1] (0 on padding rows). Padding is its own segment
(segment_ids 0), so the text's tokens never attend to it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llm_jax.data.tokenizer import PAD_ID
from llm_jax.model import Decoder

POOLINGS = ("cls", "mean")


class Classifier(Decoder):
  """Token ids [B, L] -> float32 class logits [B, 1, num_labels]; parameters: the Decoder's + cls_head."""

  num_labels: int = 2
  pooling: str = "cls"

  def setup(self):
    super().setup()
    c = self.cfg
    self.cls_head = nn.Dense(
      self.num_labels,
      dtype=jnp.float32,
      param_dtype=jnp.dtype(c.param_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("embed", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
    )

  def hidden(self, tokens_BL, positions_BL=None, segment_ids_BL=None, deterministic: bool = True):
    """The pooled final hidden state [B, 1, D]."""
    h_BLD = super().hidden(tokens_BL, positions_BL, segment_ids_BL, deterministic)
    if self.pooling == "mean":
      keep_BL = segment_ids_BL > 0 if segment_ids_BL is not None else tokens_BL != PAD_ID
      w_BL1 = keep_BL.astype(jnp.float32)[..., None]
      pooled_BD = jnp.sum(h_BLD.astype(jnp.float32) * w_BL1, axis=1) / jnp.maximum(w_BL1.sum(axis=1), 1.0)
    else:
      pooled_BD = h_BLD[:, 0].astype(jnp.float32)
    return pooled_BD[:, None, :]

  def logits(self, h_B1D, keep_dtype: bool = False):
    """Pooled states -> float32 class logits [B, 1, num_labels]."""
    del keep_dtype
    return self.cls_head(h_B1D.astype(jnp.float32))
