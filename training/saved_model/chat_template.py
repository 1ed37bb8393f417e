"""Dolly's prompt format as a chat template, so that chat servers (vLLM, TGI, ``apply_chat_template``) prompt the
model as it was trained.

How messages map onto Dolly's template:

- a ``system`` message (first only) replaces Dolly's intro line; without one, the intro is Dolly's own;
- each ``user`` message is an ``### Instruction:`` block; a ``context`` key on it (``{"role": "user", "content":
  ..., "context": ...}``) becomes Dolly's ``Input:`` block;
- each ``assistant`` message is a ``### Response:`` block closed by ``### End``, as in training;
- ``add_generation_prompt`` ends the prompt with ``### Response:`` and its newline: exactly the prompt the pipeline
  builds for the last instruction (and context).

The template is built from Dolly's constants, so it cannot drift from them.
"""

from __future__ import annotations

from .consts import END_KEY, INPUT_KEY, INSTRUCTION_KEY, INTRO_BLURB, RESPONSE_KEY


def _quoted(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


DOLLY_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] -}}"
    "{%- else -%}"
    "{{- " + _quoted(INTRO_BLURB) + " -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- " + _quoted(f"\n\n{INSTRUCTION_KEY}\n") + " + message['content'] -}}"
    "{%- if message.get('context') -%}"
    "{{- " + _quoted(f"\n\n{INPUT_KEY}\n") + " + message['context'] -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- " + _quoted(f"\n\n{RESPONSE_KEY}\n") + " + message['content'] + " + _quoted(f"\n\n{END_KEY}") + " -}}"
    "{%- elif message['role'] != 'system' or not loop.first -%}"
    "{{- raise_exception('Dolly\\'s template has system (first only), user and assistant messages') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- " + _quoted(f"\n\n{RESPONSE_KEY}\n") + " -}}"
    "{%- endif -%}"
)
