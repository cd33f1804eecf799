"""What `python -m llm_jax.serve` takes: the server's settings, shared by the HTTP process and the
engine's (serve.worker)."""

from __future__ import annotations

import dataclasses

from llm_jax.serve import audit as audit_lib
from llm_jax.serve.filters import Filters


@dataclasses.dataclass
class ServerSettings:
  """Everything `python -m llm_jax.serve` takes (see its --help)."""

  package: str  # a package, a run directory (or anything llm_jax.artifacts.open_model opens)
  step: int | str | None = None  # a run's checkpoint: None latest, 'best', or a step number
  host: str = "127.0.0.1"
  port: int = 8000
  api_key: str | None = None
  filters: Filters = dataclasses.field(default_factory=Filters)
  log_prompts: bool = False
  audit_log: str = ""
  audit_max_bytes: int = audit_lib.DEFAULT_MAX_BYTES  # 0: never rotate
  audit_backups: int = audit_lib.DEFAULT_BACKUPS
  slots: int = 8
  max_concurrent: int = 32
  decode_chunk: int = 16
  # padded prompt tokens prefilled per engine iteration; a longer prompt is prefilled in pieces
  prefill_tokens: int = 1024
  max_prompt_tokens: int = 0  # 0: max_seq_len - 1
  max_total_tokens: int = 0  # prompt + new tokens; 0: max_seq_len
  max_body_bytes: int = 1 << 20
  request_timeout_s: float = 60.0
  max_n: int = 4
  max_prompts: int = 32  # prompts in one batched completion request
  compute_dtype: str | None = None
  int8_in_memory: bool = False
  model_name: str = ""
  export_dir: str | None = None  # exported (traced) programs kept across starts; None: trace each start
  build_in_background: bool = True  # ready once the covering programs are built; the rest follow
  # the engine in a process of its own (serve.worker), so that the HTTP event loop and the engine
  # never wait for one interpreter lock; False: a thread of this process (embedding, most tests)
  engine_process: bool = False
