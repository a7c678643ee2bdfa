"""Prompt data: JSONL / Parquet records -> PromptRecord, checked before training starts.

A record has three fields; any other field is kept in ``metadata``:

    {"prompt": "What is 2+3?" | [{"role": "user", "content": "..."}, ...],
     "answer": "5" | 5,          # numbers become strings
     "source": "math"}           # names the teacher and the verifier through data.sources

Every malformed row of every file is reported (up to a cap per file) in one DataError whose lines
name the file, the 1-based row (the line number for JSONL) and the field.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataError", "PromptRecord", "load_prompts", "render_prompt", "write_jsonl"]

CORE_FIELDS = ("prompt", "answer", "source")
MAX_ERRORS_PER_FILE = 20


class DataError(ValueError):
    """Malformed prompt data; the message names file, row and field."""


@dataclass
class PromptRecord:
    prompt: str | list[dict[str, str]]
    """Plain text (used as-is) or chat messages [{role, content}, ...] (rendered by the chat template)."""

    answer: str
    """Gold answer handed to the verifier."""

    source: str
    """Data source: a key of data.sources, which names this prompt's teacher and verifier."""

    index: int = 0
    """Position of the record in the list returned by load_prompts."""

    metadata: dict[str, Any] = field(default_factory=dict)
    """The row's other fields, written back unchanged by write_jsonl."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_prompt(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "field 'prompt' is empty")
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        if not value:
            return None, "field 'prompt' is an empty list of messages"
        messages = []
        for i, m in enumerate(value, start=1):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return None, (f"field 'prompt' message {i} must be {{\"role\": str, \"content\": str}}, "
                              f"got {_short(m)}")
            messages.append({"role": m["role"], "content": m["content"]})
        return messages, None
    return None, (f"field 'prompt' must be a string or a list of {{role, content}} messages, "
                  f"got {_type_name(value)}")


def _check_answer(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, None
    # bool is an int subclass, but True as a gold answer is almost surely a broken export.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, f"field 'answer' must be finite, got {value}"
        return (str(int(value)) if value.is_integer() else repr(value)), None
    if value is None:
        return None, "field 'answer' is null (expected a string or a number)"
    return None, f"field 'answer' must be a string or a number, got {_type_name(value)}"


def _check_row(row: Any, sources: Mapping[str, Any] | None) -> tuple[PromptRecord | None, list[str]]:
    if not isinstance(row, Mapping):
        return None, [f"expected a JSON object with fields prompt, answer, source, got {_type_name(row)}"]
    errors = []
    prompt = answer = None
    if "prompt" not in row:
        errors.append("field 'prompt' is missing")
    else:
        prompt, err = _check_prompt(row["prompt"])
        errors += [err] if err else []
    if "answer" not in row:
        errors.append("field 'answer' is missing")
    else:
        answer, err = _check_answer(row["answer"])
        errors += [err] if err else []
    source = row.get("source")
    known = sorted(sources) if sources else []
    if source is None:
        if len(known) > 1:
            errors.append(f"field 'source' is missing (needed to pick one of data.sources: {', '.join(known)})")
        source = known[0] if known else ""
    elif not isinstance(source, str):
        errors.append(f"field 'source' must be a string, got {_type_name(source)}")
    elif known and source not in sources:
        errors.append(f"source '{source}' is not in data.sources (known: {', '.join(known)})")
    if errors:
        return None, errors
    metadata = {k: v for k, v in row.items() if k not in CORE_FIELDS}
    return PromptRecord(prompt=prompt, answer=answer, source=source, metadata=metadata), []


def _read_jsonl(path: str) -> Iterable[tuple[int, Any, str | None]]:
    """(line number, parsed row or None, error) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e})"


def _read_parquet(path: str) -> Iterable[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("prompt", "answer") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: field {', '.join(repr(c) for c in missing)} is missing "
                        f"(no such column; columns: {', '.join(table.column_names)})")
    for row_number, row in enumerate(table.to_pylist(), start=1):
        yield row_number, row, None


def _load_file(path: str, sources: Mapping[str, Any] | None, max_errors: int) -> tuple[list[PromptRecord], list[str]]:
    ext = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _read_jsonl, ".parquet": _read_parquet}
    if ext not in readers:
        return [], [f"{path}: unsupported file type '{ext}' (expected .jsonl or .parquet)"]
    if not os.path.isfile(path):
        return [], [f"{path}: file not found"]
    records, errors, n_errors, n_rows = [], [], 0, 0
    try:
        for row_number, row, read_error in readers[ext](path):
            n_rows += 1
            record, row_errors = (None, [read_error]) if read_error else _check_row(row, sources)
            if record is not None:
                records.append(record)
            n_errors += len(row_errors)
            room = max(0, max_errors - len(errors))
            errors += [f"{path} row {row_number}: {e}" for e in row_errors[:room]]
    except DataError as e:
        return [], [str(e)]
    except UnicodeDecodeError as e:
        return [], [f"{path}: not UTF-8 text ({e})"]
    except Exception as e:  # pyarrow.ArrowInvalid and friends: not a readable file
        return [], [f"{path}: cannot read {ext[1:]} file ({type(e).__name__}: {e})"]
    if n_errors > len(errors):
        errors.append(f"{path}: ... and {n_errors - len(errors)} more problems in this file")
    if n_rows == 0:
        errors.append(f"{path}: contains no prompts")
    return records, errors


def load_prompts(paths: str | os.PathLike | Iterable[str | os.PathLike],
                 sources: Mapping[str, Any] | Iterable[str] | None = None, *,
                 max_errors_per_file: int = MAX_ERRORS_PER_FILE) -> list[PromptRecord]:
    """Read and check every row of ``paths`` (.jsonl / .parquet); one DataError lists all problems.

    ``sources`` (data.sources, or just its names) restricts the ``source`` field; a row without a
    ``source`` gets the only source when there is one. None or empty: any source is accepted.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if sources is not None and not isinstance(sources, Mapping):
        sources = {name: None for name in sources}
    records: list[PromptRecord] = []
    errors: list[str] = []
    for path in paths:
        file_records, file_errors = _load_file(os.fspath(path), sources or None, max_errors_per_file)
        records += file_records
        errors += file_errors
    if errors:
        raise DataError("invalid prompt data:\n  " + "\n  ".join(errors))
    for i, record in enumerate(records):
        record.index = i
    return records


def render_prompt(record: PromptRecord, tokenizer: Any,
                  chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of the prompt: chat messages through the tokenizer's chat template (with the
    generation prompt appended), plain strings encoded as they are."""
    if isinstance(record.prompt, str):
        return list(tokenizer(record.prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"prompt {record.index} (source '{record.source}') is a list of chat messages, "
                        "but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True,
                                         **dict(chat_template_kwargs or {}))
    # The template already wrote the special tokens (BOS, role markers): don't add them twice.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _to_row(record: PromptRecord | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(record, PromptRecord):
        return {**record.metadata, "prompt": record.prompt, "answer": record.answer, "source": record.source}
    return dict(record)


def write_jsonl(records: Iterable[PromptRecord | Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write records as JSONL atomically (temp file + os.replace); returns the number of rows."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(_to_row(record), ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n
