"""Prometheus metrics of the server, in a registry of its own (so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ROUTES = (
  "/v1/completions",
  "/v1/chat/completions",
  "/v1/models",
  "/health",
  "/metrics",
  "/tokenize",
  "/detokenize",
  "/tokenizer_info",
)


class Metrics:
  """Requests by route and status, latency and time-to-first-token, tokens, queue and slots."""

  def __init__(self, slots: int = 0):
    self.registry = r = CollectorRegistry()
    self.requests = Counter(
      "llm_requests_total", "HTTP requests by route and status code", ["route", "status"], registry=r
    )
    self.latency = Histogram(
      "llm_request_latency_seconds", "Completion request latency", buckets=LATENCY_BUCKETS, registry=r
    )
    self.ttft = Histogram(
      "llm_time_to_first_token_seconds",
      "Time from request to first token",
      buckets=LATENCY_BUCKETS,
      registry=r,
    )
    self.generated_tokens = Counter("llm_generated_tokens_total", "Tokens generated", registry=r)
    self.prompt_tokens = Counter("llm_prompt_tokens_total", "Prompt tokens admitted", registry=r)
    self.queue_depth = Gauge("llm_queue_depth", "Sequences waiting for a batch slot", registry=r)
    self.busy_slots = Gauge("llm_busy_slots", "Batch slots decoding", registry=r)
    self.slots = Gauge("llm_batch_slots", "Batch slots in the engine", registry=r)
    self.slots.set(slots)
    self.finished = Counter(
      "llm_sequences_finished_total", "Sequences by finish reason", ["reason"], registry=r
    )

  def route(self, path: str) -> str:
    return path if path in ROUTES else "other"

  def render(self) -> bytes:
    return generate_latest(self.registry)
