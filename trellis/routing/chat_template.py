"""A checkpoint's chat template (tokenizer_config.json `chat_template`), rendered the way transformers does.

transformers renders with a sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls),
the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the helpers
`raise_exception` and `strftime_now`; templates written for it (every Hugging Face checkpoint's)
render the same here. Invariant: rendering either returns the prompt text or raises InvalidRequest
with one line (a template that refuses the conversation, e.g. roles that do not alternate, is the
client's problem, not a crash).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trellis.core.errors import InvalidRequest, ModelError

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer transformers saves the template beside the config


class TemplateRefused(Exception):
    """raise_exception(...) called by a template."""


def _raise_exception(message: str) -> None:
    raise TemplateRefused(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _token_text(token: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(token, Mapping):
        return str(token.get("content", ""))
    return "" if token is None else str(token)


def _template_source(raw: Any) -> str | None:
    """The default template: a string, or the entry named "default" of a list of named templates."""
    if isinstance(raw, str):
        return raw or None
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
        default = named.get("default")
        return default if isinstance(default, str) and default else None
    return None


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation; raises InvalidRequest when the template refuses it."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            return env.from_string(self.source).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateRefused as e:
            raise InvalidRequest(f"messages: the model's chat template refused them: {e}") from None
        except jinja2.TemplateError as e:
            raise InvalidRequest(f"messages: the model's chat template failed on them: {e}") from None


def load_chat_template(model_dir: str | Path | None) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none (no directory, no file, no template).
    A tokenizer_config.json that is not JSON, or a template that does not parse, is a ModelError."""
    if model_dir is None:
        return None
    path, jinja_file = Path(model_dir) / CONFIG_FILE, Path(model_dir) / TEMPLATE_FILE
    config: Any = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: not readable JSON: {e}") from None
    config = config if isinstance(config, dict) else {}
    source = jinja_file.read_text() if jinja_file.is_file() else _template_source(config.get("chat_template"))
    if not source:
        return None
    try:
        ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise ModelError(f"{path}: chat_template does not parse: {e}") from None
    return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))
