"""Readers for the published file formats -> typed records (records.py).

Each reader takes a local path and returns a non-empty list of records; bad
input raises `DataFormatError` naming the file, the record index (0-based) and
the field. Conventions follow the MetaMath release (Yu et al. 2023, arXiv
2309.12284) and lm-evaluation-harness:

* MetaMathQA (`MetaMathQA-395K.json`): one JSON list of objects with `type`,
  `query`, `response` (and `original_question`); JSON lines also accepted.
* GSM8K: JSON lines with `question`, `answer`; the answer's last "#### N" line
  holds the final answer.
* HellaSwag (harness `hellaswag`): context = preprocess(activity_label + ": " +
  ctx_a + " " + ctx_b.capitalize()), choices = preprocess(ending), where
  preprocess strips, turns " [title]" into ". ", deletes "[...]" and collapses
  double spaces; continuation = " " + choice.
* ARC (harness `arc_challenge`): context "Question: {stem}\\nAnswer:",
  continuation " " + choice text, label = index of answerKey among the choice
  labels. Both the AI2 layout (question.stem, question.choices[{text,label}])
  and the Hugging Face layout (question str, choices{text[],label[]}) are read.
* WinoGrande (harness `winogrande`, partial scoring): contexts = sentence up to
  "_" with option1 / option2 filled in; continuation = " " + (text after "_",
  stripped), shared; label = int(answer) - 1.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from optconsist_jax import storage
from optconsist_jax.data.records import MathExample, MultipleChoice

_ANSWER_IS = "The answer is: "


class DataFormatError(ValueError):
  """A data file that does not follow its published format."""


def _where(path: str, index: int | None, field: str | None = None) -> str:
  s = path
  if index is not None:
    s += f": record {index}"
  if field is not None:
    s += f": field {field!r}"
  return s


def _iter_json_lines(path: str) -> Iterator[tuple[int, Any]]:
  with storage.open_file(path) as f:
    index = 0
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield index, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{_where(path, index)} (line {line_no}): malformed JSON: {e}"
        ) from None
      index += 1


def _json_list_error(path: str, text: str, err: json.JSONDecodeError) -> str:
  """Finds which record of a JSON list broke, for the error message."""
  decoder = json.JSONDecoder()
  pos = text.find("[")
  if pos < 0:
    return f"{path}: malformed JSON (not a list): {err}"
  pos += 1
  index = 0
  ws = re.compile(r"[\s,]*")
  while True:
    pos = ws.match(text, pos).end()
    if pos >= len(text) or text[pos] == "]":
      return f"{path}: malformed JSON: {err}"
    try:
      _, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      return f"{_where(path, index)}: malformed JSON: {e}"
    index += 1


def _iter_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
  """(index, object) of a JSON list file or a JSON lines file."""
  path = os.fspath(path)
  if not storage.is_file(path):
    raise FileNotFoundError(f"data file not found: {path}")
  with storage.open_file(path) as f:
    head = f.read(4096).lstrip()
  if head.startswith("["):
    text = storage.read_text(path)
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataFormatError(_json_list_error(path, text, e)) from None
    yield from enumerate(data)
  else:
    yield from _iter_json_lines(path)


def _field(path: str, index: int, record: Any, name: str,
           kind: type | tuple[type, ...] = str) -> Any:
  if not isinstance(record, dict):
    raise DataFormatError(
        f"{_where(path, index)}: expected a JSON object, got"
        f" {type(record).__name__}")
  if name not in record:
    raise DataFormatError(
        f"{_where(path, index, name)}: missing field (record has"
        f" {sorted(record)})")
  value = record[name]
  if not isinstance(value, kind):
    raise DataFormatError(
        f"{_where(path, index, name)}: expected {kind}, got"
        f" {type(value).__name__}")
  return value


def _read(path: str | os.PathLike, parse: Callable[[str, int, Any], Any],
          what: str) -> list[Any]:
  path = os.fspath(path)
  out = [parse(path, i, r) for i, r in _iter_records(path)]
  if not out:
    raise DataFormatError(f"{path}: empty {what} dataset (no records)")
  return out


# ---------------------------------------------------------------- math


def answer_after_marker(text: str, marker: str) -> str | None:
  """Text after the last `marker` up to the end of its line, stripped."""
  pos = text.rfind(marker)
  if pos < 0:
    return None
  return text[pos + len(marker):].split("\n", 1)[0].strip()


def parse_metamath_record(path: str, i: int, r: Any) -> MathExample:
  query = _field(path, i, r, "query")
  response = _field(path, i, r, "response")
  rtype = r.get("type", "") if isinstance(r, dict) else ""
  original = r.get("original_question", "")
  answer = answer_after_marker(response, _ANSWER_IS)
  if answer is None:
    answer = answer_after_marker(response, "####")
  if answer is None:
    raise DataFormatError(
        f"{_where(path, i, 'response')}: no final answer (neither"
        f" {_ANSWER_IS!r} nor '####')")
  return MathExample(query=query, response=response, answer=answer,
                     type=str(rtype), original_question=str(original or ""))


def read_metamathqa(path: str | os.PathLike) -> list[MathExample]:
  """MetaMathQA records (one JSON list, or JSON lines)."""
  return _read(path, parse_metamath_record, "MetaMathQA")


def _parse_gsm8k(path: str, i: int, r: Any) -> MathExample:
  question = _field(path, i, r, "question")
  answer_text = _field(path, i, r, "answer")
  answer = answer_after_marker(answer_text, "####")
  if not answer:
    raise DataFormatError(
        f"{_where(path, i, 'answer')}: no '#### N' final answer line")
  return MathExample(query=question, response=answer_text, answer=answer,
                     type="gsm8k")


def read_gsm8k(path: str | os.PathLike) -> list[MathExample]:
  """GSM8K JSON lines (`question`, `answer` ending with "#### N")."""
  return _read(path, _parse_gsm8k, "GSM8K")


# ---------------------------------------------------------------- retention


def hellaswag_preprocess(text: str) -> str:
  """lm-evaluation-harness's HellaSwag cleanup of WikiHow bracket artifacts."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  text = text.replace("  ", " ")
  return text


def _label_int(path: str, i: int, value: Any, field: str, n: int) -> int:
  try:
    label = int(value)
  except (TypeError, ValueError):
    raise DataFormatError(
        f"{_where(path, i, field)}: label {value!r} is not an integer"
        " (unlabelled test split?)") from None
  if not 0 <= label < n:
    raise DataFormatError(
        f"{_where(path, i, field)}: label {label} out of range for {n} choices")
  return label


def _parse_hellaswag(path: str, i: int, r: Any) -> MultipleChoice:
  ctx_a = _field(path, i, r, "ctx_a")
  ctx_b = _field(path, i, r, "ctx_b")
  activity = _field(path, i, r, "activity_label")
  endings = _field(path, i, r, "endings", list)
  if not endings or not all(isinstance(e, str) for e in endings):
    raise DataFormatError(
        f"{_where(path, i, 'endings')}: expected a non-empty list of strings")
  label = _label_int(path, i, _field(path, i, r, "label", (int, str)), "label",
                     len(endings))
  ctx = ctx_a + " " + ctx_b.capitalize()
  context = hellaswag_preprocess(activity + ": " + ctx)
  choices = tuple(hellaswag_preprocess(e) for e in endings)
  return MultipleChoice(contexts=(context,) * len(choices),
                        continuations=tuple(" " + c for c in choices),
                        choices=choices, label=label, benchmark="hellaswag",
                        id=str(r.get("ind", i)))


def read_hellaswag(path: str | os.PathLike) -> list[MultipleChoice]:
  """HellaSwag JSON lines (ctx_a, ctx_b, activity_label, endings, label)."""
  return _read(path, _parse_hellaswag, "HellaSwag")


def _parse_arc(path: str, i: int, r: Any) -> MultipleChoice:
  question = _field(path, i, r, "question", (dict, str))
  if isinstance(question, dict):  # AI2 layout.
    stem = question.get("stem")
    choices = question.get("choices")
    if not isinstance(stem, str):
      raise DataFormatError(f"{_where(path, i, 'question.stem')}: missing")
    if not isinstance(choices, list) or not choices:
      raise DataFormatError(f"{_where(path, i, 'question.choices')}: missing")
    try:
      texts = [c["text"] for c in choices]
      labels = [str(c["label"]) for c in choices]
    except (KeyError, TypeError):
      raise DataFormatError(
          f"{_where(path, i, 'question.choices')}: each choice needs text and"
          " label") from None
  else:  # Hugging Face layout.
    stem = question
    choices = _field(path, i, r, "choices", dict)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list):
      raise DataFormatError(
          f"{_where(path, i, 'choices')}: needs lists text and label")
    labels = [str(x) for x in labels]
  key = str(_field(path, i, r, "answerKey", (str, int)))
  if key not in labels:
    raise DataFormatError(
        f"{_where(path, i, 'answerKey')}: {key!r} not among choice labels"
        f" {labels}")
  context = f"Question: {stem}\nAnswer:"
  return MultipleChoice(contexts=(context,) * len(texts),
                        continuations=tuple(" " + t for t in texts),
                        choices=tuple(texts),
                        label=labels.index(key), benchmark="arc",
                        id=str(r.get("id", i)))


def read_arc(path: str | os.PathLike) -> list[MultipleChoice]:
  """ARC JSON lines (question{stem, choices[{text,label}]}, answerKey)."""
  return _read(path, _parse_arc, "ARC")


def _parse_winogrande(path: str, i: int, r: Any) -> MultipleChoice:
  sentence = _field(path, i, r, "sentence")
  option1 = _field(path, i, r, "option1")
  option2 = _field(path, i, r, "option2")
  if "_" not in sentence:
    raise DataFormatError(f"{_where(path, i, 'sentence')}: no '_' blank")
  label = _label_int(path, i, _field(path, i, r, "answer", (str, int)),
                     "answer", 3) - 1
  if label < 0:
    raise DataFormatError(f"{_where(path, i, 'answer')}: expected '1' or '2'")
  blank = sentence.index("_")
  prefix, suffix = sentence[:blank], sentence[blank + 1:].strip()
  contexts = (prefix + option1, prefix + option2)
  return MultipleChoice(contexts=contexts, choices=contexts,
                        continuations=(" " + suffix,) * 2, label=label,
                        benchmark="winogrande", id=str(r.get("qID", i)))


def read_winogrande(path: str | os.PathLike) -> list[MultipleChoice]:
  """WinoGrande JSON lines (sentence, option1, option2, answer "1"/"2")."""
  return _read(path, _parse_winogrande, "WinoGrande")


# ---------------------------------------------------------------- text


def read_text(path: str | os.PathLike) -> list[str]:
  """Documents for held-out LM loss.

  A `.jsonl`/`.json` file gives each record's `text`; any other file is plain
  text whose documents are separated by one or more blank lines.
  """
  path = os.fspath(path)
  if path.endswith((".jsonl", ".json")):
    docs = _read(path, lambda p, i, r: _field(p, i, r, "text"), "text")
  else:
    if not storage.is_file(path):
      raise FileNotFoundError(f"data file not found: {path}")
    docs = [d.strip("\n")
            for d in re.split(r"\n\s*\n", storage.read_text(path))]
  docs = [d for d in docs if d.strip()]
  if not docs:
    raise DataFormatError(f"{path}: empty text dataset (no documents)")
  return docs


READERS = {
    "metamathqa": read_metamathqa,
    "gsm8k": read_gsm8k,
    "hellaswag": read_hellaswag,
    "arc": read_arc,
    "arc_challenge": read_arc,
    "winogrande": read_winogrande,
    "text": read_text,
}
