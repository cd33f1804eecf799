"""A chat turn template (llm_jax.finetune.sft's `turn`, e.g. `<|{role}|>\\n{content}\\n`) as the Jinja
`chat_template` Hugging Face tokenizers carry: /tokenizer_info serves it, an HF export writes it into
tokenizer_config.json, so clients that render chats themselves render them as SFT training did.
"""

from __future__ import annotations

import json


def jinja_chat_template(turn: str, bos: str) -> str:
  """The chat template as a Jinja template (for clients that render chats themselves): BOS, each
  message through the turn template, and the assistant's header with add_generation_prompt."""
  head, tail = turn.split("{content}", 1)

  def fill(part: str, role: str) -> str:  # a literal with {role} filled, as Jinja expressions
    pieces = part.split("{role}")
    out = " ~ ".join(json.dumps(p.replace("{{", "{").replace("}}", "}")) for p in pieces[:1])
    for p in pieces[1:]:
      out += f" ~ {role} ~ " + json.dumps(p.replace("{{", "{").replace("}}", "}"))
    return "{{ " + out + " }}"

  return (
    "{{ "
    + json.dumps(bos)
    + " }}{% for message in messages %}"
    + fill(head, "message['role']")
    + "{{ message['content'] }}"
    + fill(tail, "message['role']")
    + "{% endfor %}{% if add_generation_prompt %}"
    + fill(head, "'assistant'")
    + "{% endif %}"
  )
