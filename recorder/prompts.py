"""Read prompts: `.txt` (one per line) or `.jsonl` (a text field or chat `messages`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traces.errors import InputError


@dataclass
class Prompt:
    """One prompt: plain text, or chat messages to render with the tokenizer's chat template."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    line: int = 0  # 1-based line in the prompts file, for error messages


@dataclass
class PromptSet:
    path: Path
    prompts: list[Prompt]
    sha256: str
    blank_lines: int = 0
    notes: list[str] = field(default_factory=list)


def load_prompts(path: str | Path, prompt_field: str = "text") -> PromptSet:
    """Parse and check the whole prompts file up front, so a malformed line fails before anything is
    recorded."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such prompts file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a prompts file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read prompts file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: prompts file is not UTF-8 text (byte {exc.start})") from None
    sha = hashlib.sha256(raw).hexdigest()
    lines = text.splitlines()
    if path.suffix.lower() == ".jsonl":
        prompts, blank = _parse_jsonl(path, lines, prompt_field)
    else:
        prompts = [Prompt(text=line, line=i + 1) for i, line in enumerate(lines) if line.strip()]
        blank = len(lines) - len(prompts)
    if not prompts:
        raise InputError(f"{path}: no prompts in the file")
    return PromptSet(path, prompts, sha, blank)


def _parse_jsonl(path: Path, lines: list[str], prompt_field: str) -> tuple[list[Prompt], int]:
    prompts: list[Prompt] = []
    blank = 0
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{i}: expected a JSON object")
        if prompt_field in obj:
            value = obj[prompt_field]
            if not isinstance(value, str):
                raise InputError(f"{path}:{i}: field {prompt_field!r} is not a string")
            prompts.append(Prompt(text=value, line=i))
        elif "messages" in obj:
            msgs = obj["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
            if not ok:
                raise InputError(f"{path}:{i}: 'messages' must be a non-empty list of {{role, content}} "
                                 "strings")
            prompts.append(Prompt(messages=msgs, line=i))
        else:
            raise InputError(f"{path}:{i}: no {prompt_field!r} field and no 'messages' (see --prompt-field)")
    return prompts, blank


def render(prompt: Prompt, tokenizer: Any, source: Path) -> tuple[str, bool]:
    """(text, add_special_tokens): chat messages through the chat template, which adds its own special
    tokens."""
    if prompt.messages is None:
        return prompt.text or "", True
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{source}:{prompt.line}: chat messages given but the tokenizer has no chat "
                         "template")
    try:
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # template errors come from jinja with many types
        raise InputError(f"{source}:{prompt.line}: chat template failed ({exc})") from None
    return str(text), False
