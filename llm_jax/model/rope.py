"""Rotary position embeddings (LLaMA), with the linear and llama3 frequency scalings."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llm_jax.model.config import ModelConfig

ROPE_SCALINGS = ("none", "linear", "llama3")


def rope_scaled_frequencies(cfg: ModelConfig) -> np.ndarray | None:
  """[head_dim // 2] float32 RoPE frequencies under cfg.rope_scaling; None when it is "none".

  The arithmetic is Hugging Face's (float32, the same order of operations), so that imported LLaMA
  3.x checkpoints give the same angles.
  """
  if cfg.rope_scaling == "none":
    return None
  if cfg.rope_scaling not in ROPE_SCALINGS:
    raise ValueError(f"rope_scaling={cfg.rope_scaling!r} is not one of {', '.join(ROPE_SCALINGS)}")
  h = cfg.head_dim
  freq_h = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, h, 2).astype(np.float32) / h))
  freq_h = freq_h.astype(np.float32)
  factor = np.float32(cfg.rope_scaling_factor)
  if cfg.rope_scaling == "linear":
    return (freq_h / factor).astype(np.float32)
  low, high = np.float32(cfg.rope_low_freq_factor), np.float32(cfg.rope_high_freq_factor)
  old_len = np.float32(cfg.rope_original_max_len)
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen_h = np.float32(2 * math.pi) / freq_h
  scaled_h = np.where(wavelen_h > low_wavelen, freq_h / factor, freq_h)
  smooth_h = (old_len / wavelen_h - low) / (high - low)
  smoothed_h = (1 - smooth_h) * scaled_h / factor + smooth_h * scaled_h
  medium_h = ~(wavelen_h < high_wavelen) & ~(wavelen_h > low_wavelen)
  return np.where(medium_h, smoothed_h, scaled_h).astype(np.float32)


def rope(x_BLNH, positions_BL, theta: float, freq_h=None):
  """Rotary position embedding (rotate-half convention), in float32; freq_h overrides the frequencies."""
  h = x_BLNH.shape[-1]
  if freq_h is None:
    freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  else:
    freq = jnp.asarray(freq_h, jnp.float32)
  angle_BLh = positions_BL[..., None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle_BLh)[:, :, None, :], jnp.cos(angle_BLh)[:, :, None, :]
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLNH.dtype)
