"""Joining a multi-process job through JAX's own distributed runtime (`jax.distributed`).

How a process finds its peers, in this order:

1. `LLM_JAX_CLUSTER` = single | explicit | slurm | tpu forces one method (the launchers in launch/ set it).
2. explicit: `config.distributed.coordinator_address` (or `JAX_COORDINATOR_ADDRESS`) with
   `distributed.num_processes` / `distributed.process_id` (or `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`).
3. slurm: an `srun` step with more than one task (`SLURM_NTASKS` > 1, `SLURM_PROCID`, ...); the
   coordinator is the step's first node, one process per task, one GPU per process when run on GPUs.
4. tpu: a Cloud TPU VM (JAX's TPU detection, or TPU_WORKER_HOSTNAMES / MEGASCALE_* in the environment).
5. single: one process, no coordinator.

Failure: every process sends heartbeats to the coordination service (hosted by process 0). A process
that stops (killed, crashed, host lost) is declared dead after `distributed.heartbeat_timeout_s`; the
service then stops every other process with "The following tasks are unhealthy (stopped sending
heartbeats): <process ids>". A process that fails with an error (an uncaught exception, or the train
CLI's error exit through `fail_fast`) records the reason with the coordinator and exits at once, without
the shutdown barrier that would hold its peers for the shutdown timeout; a peer whose collective then
breaks prints "another process failed first: process <i>: <reason>" and exits too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Mapping

import jax

try:  # JAX internals read where present: TPU VM detection and the coordination-service client
  from jax._src import cloud_tpu_init as _cloud_tpu_init
  from jax._src import distributed as _jax_distributed
except ImportError:  # pragma: no cover - layout of a future jax
  _cloud_tpu_init = _jax_distributed = None

log = logging.getLogger(__name__)

METHODS = ("single", "explicit", "slurm", "tpu")
CLUSTER_ENV = "LLM_JAX_CLUSTER"
INIT_TIMEOUT_ENV = "LLM_JAX_INIT_TIMEOUT_S"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedError(RuntimeError):
  """The multi-process settings are incomplete or contradictory; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the job (None fields are left to JAX's cluster detection)."""

  method: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def multi_process(self) -> bool:
    return self.method != "single"


def _int(environ: Mapping[str, str], key: str) -> int | None:
  value = environ.get(key, "")
  if value == "":
    return None
  try:
    return int(value)
  except ValueError as e:
    raise DistributedError(f"environment variable {key}={value!r} is not an integer") from e


def _on_tpu_vm() -> bool:
  """JAX's own Cloud TPU VM detection (set when jax is imported on a TPU host)."""
  return bool(getattr(_cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _explicit(config, environ: Mapping[str, str]) -> Launch | None:
  """The explicit settings (config first, then JAX_* variables), or None when none are given."""
  di = config.distributed
  env_complete = all(
    environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  )
  if not di.coordinator_address and not env_complete:
    if di.num_processes > 0 or di.process_id >= 0:
      raise DistributedError(
        "distributed.num_processes/distributed.process_id are set but distributed.coordinator_address "
        "is empty; set --config.distributed.coordinator_address=HOST:PORT (process 0's host)"
      )
    return None
  address = di.coordinator_address or environ["JAX_COORDINATOR_ADDRESS"]
  num = di.num_processes if di.num_processes > 0 else _int(environ, "JAX_NUM_PROCESSES")
  pid = di.process_id if di.process_id >= 0 else _int(environ, "JAX_PROCESS_ID")
  if ":" not in address:
    raise DistributedError(f"distributed.coordinator_address={address!r} must be HOST:PORT")
  if num is None or num <= 0:
    raise DistributedError(
      f"distributed.coordinator_address={address!r} is set but distributed.num_processes is not; "
      "set --config.distributed.num_processes=N (or JAX_NUM_PROCESSES)"
    )
  if pid is None or pid < 0:
    raise DistributedError(
      f"distributed.coordinator_address={address!r} is set but distributed.process_id is not; "
      "set --config.distributed.process_id=I (or JAX_PROCESS_ID), 0 <= I < num_processes"
    )
  if not 0 <= pid < num:
    raise DistributedError(f"distributed.process_id={pid} must be in [0, distributed.num_processes={num})")
  return Launch("explicit", address, num, pid)


def _slurm(environ: Mapping[str, str]) -> bool:
  return all(k in environ for k in _SLURM_VARS) and (_int(environ, "SLURM_NTASKS") or 1) > 1


def _tpu(environ: Mapping[str, str]) -> bool:
  return any(environ.get(k) for k in _TPU_VARS) or _on_tpu_vm()


def detect(config, environ: Mapping[str, str] | None = None) -> Launch:
  """Decides how this process joins the job, from the config and the environment; starts nothing."""
  environ = os.environ if environ is None else environ
  forced = environ.get(CLUSTER_ENV, "").strip().lower() or "auto"
  if forced not in METHODS + ("auto",):
    raise DistributedError(f"{CLUSTER_ENV}={forced!r} is not one of auto, {', '.join(METHODS)}")
  if forced == "single":
    return Launch("single")
  explicit = _explicit(config, environ)
  if forced == "explicit" and explicit is None:
    raise DistributedError(
      f"{CLUSTER_ENV}=explicit needs distributed.coordinator_address "
      "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
    )
  if explicit is not None and forced in ("auto", "explicit"):
    return explicit
  if forced == "slurm" or (forced == "auto" and _slurm(environ)):
    missing = [k for k in _SLURM_VARS if k not in environ]
    if missing:
      raise DistributedError(
        f"{CLUSTER_ENV}=slurm but {', '.join(missing)} is not set; start the "
        "processes with srun inside the allocation"
      )
    return Launch("slurm")
  if forced == "tpu" or (forced == "auto" and _tpu(environ)):
    return Launch("tpu")
  return Launch("single")


def _init_kwargs(launch: Launch, config, environ: Mapping[str, str]) -> dict:
  heartbeat = int(config.distributed.heartbeat_timeout_s)
  if heartbeat <= 0:
    raise DistributedError(f"distributed.heartbeat_timeout_s={heartbeat} must be positive")
  kwargs = dict(
    initialization_timeout=_int(environ, INIT_TIMEOUT_ENV) or 300,
    heartbeat_timeout_seconds=heartbeat,
    # A process that finishes waits this long for the others at exit; a peer stuck longer is an error.
    shutdown_timeout_seconds=max(heartbeat, 30),
  )
  if launch.method == "explicit":
    kwargs.update(
      coordinator_address=launch.coordinator_address,
      num_processes=launch.num_processes,
      process_id=launch.process_id,
    )
  elif launch.method == "slurm":
    kwargs.update(cluster_detection_method="slurm")
  return kwargs


def initialize(config, environ: Mapping[str, str] | None = None) -> Launch:
  """Joins the job (call before any other JAX call); logs one line per process with its devices."""
  global _heartbeat_s
  environ = os.environ if environ is None else environ
  launch = detect(config, environ)
  if launch.multi_process and not jax.distributed.is_initialized():
    kwargs = _init_kwargs(launch, config, environ)
    log.info(
      "joining a %s job: %s",
      launch.method,
      {k: v for k, v in kwargs.items() if k != "cluster_detection_method"},
    )
    _heartbeat_s = kwargs["heartbeat_timeout_seconds"]
    try:
      jax.distributed.initialize(**kwargs)
    except Exception as e:
      raise DistributedError(
        f"jax.distributed.initialize failed for a {launch.method} launch ({kwargs}): {e}. Check that "
        "every process got the same coordinator address and process count, that process 0 is "
        "running, and that its port is reachable from every host"
      ) from e
    _exit_fast_on_uncaught_exceptions()
  log.info("%s", describe_process())
  return launch


def describe_process() -> str:
  """'process 0/2 on host h (pid 123): 4 local cpu devices [cpu:0 ...] of 8 in the job'."""
  local = jax.local_devices()
  names = " ".join(f"{d.platform}:{d.id}" for d in local)
  kind = local[0].device_kind if local else "?"
  return (
    f"process {jax.process_index()}/{jax.process_count()} on host {socket.gethostname()} "
    f"(pid {os.getpid()}): {len(local)} local {kind} devices [{names}] of "
    f"{jax.device_count()} in the job"
  )


def is_main_process() -> bool:
  """True on process 0, the one that writes metrics, samples and progress."""
  return jax.process_index() == 0


_FAILED_KEY = "llm_jax/failed/"
_PEER_TROUBLE = re.compile(
  r"gloo|nccl|connection reset|socket closed|unavailable|deadline.exceeded|"
  r"coordination service|heartbeat",
  re.IGNORECASE,
)
_heartbeat_s = 100  # set by initialize


def _client():
  """JAX's coordination-service client of this process, or None."""
  return getattr(getattr(_jax_distributed, "global_state", None), "client", None)


def _announce_failure(process: int, reason: str) -> None:
  """Records this process's failure with the coordinator, where peers that fail next can read it."""
  client = _client()
  try:
    client.key_value_set(f"{_FAILED_KEY}{process}", reason[:500] or "failed", True)
  except Exception:  # best effort: no client, or the coordinator (process 0) is the one that is gone
    pass


def _failures_of_others(process: int) -> list[str]:
  """'process 3: ValueError: ...' for each failure another process recorded."""
  client = _client()
  try:
    return [
      f"process {key.rsplit('/', 1)[-1]}: {value}"
      for key, value in client.key_value_dir_get(_FAILED_KEY)
      if key.rsplit("/", 1)[-1] != str(process)
    ]
  except Exception:  # best effort, as in _announce_failure
    return []


def fail_fast(code: int = 1, reason: str = "") -> int:
  """Ends a failing process of a multi-process job now; alone, returns `code` for a normal exit.

  A normal exit waits at JAX's shutdown barrier for peers that are blocked waiting for this process,
  and the barrier's eventual error names the wrong process. Exiting at once (after recording the reason
  with the coordinator, where peers that fail next read it) lets the others stop within
  distributed.heartbeat_timeout_s, with a message naming the process that failed first.
  """
  if not jax.distributed.is_initialized():
    return code
  me, n = jax.process_index(), jax.process_count()
  _announce_failure(me, reason)
  others = _failures_of_others(me)
  if not others and _PEER_TROUBLE.search(reason):
    # A broken collective: most likely a peer died without a word (killed, out of memory, host lost).
    # Wait, at most the heartbeat bound, for the coordination service to name it (it stops this
    # process with "The following tasks are unhealthy") or for a peer's failure record.
    log.error(
      "process %d/%d: %s; waiting up to %d s for the coordination service to name the process that stopped",
      me,
      n,
      reason,
      _heartbeat_s,
    )
    deadline = time.monotonic() + _heartbeat_s + 5
    while not others and time.monotonic() < deadline:
      time.sleep(0.5)
      others = _failures_of_others(me)
  if others:
    log.error("process %d/%d is stopping because another process failed first: %s", me, n, "; ".join(others))
  log.error(
    "process %d/%d failed (exit status %d%s): exiting now; the other processes stop within "
    "distributed.heartbeat_timeout_s",
    me,
    n,
    code,
    f": {reason}" if reason else "",
  )
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed or broken stream must not keep the process alive
      pass
  logging.shutdown()
  os._exit(code)


def _exit_fast_on_uncaught_exceptions() -> None:
  """An uncaught exception ends this process at once (see fail_fast) after printing its traceback."""
  previous = sys.excepthook

  def hook(kind, value, tb):
    previous(kind, value, tb)
    fail_fast(1, f"{kind.__name__}: {value}".splitlines()[0])

  sys.excepthook = hook
