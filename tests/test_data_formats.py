"""Readers of the published formats, the synthetic data and bad-input errors."""

import json
import re

import pytest

from optconsist_jax.data import formats, synthetic
from optconsist_jax.data.formats import DataFormatError


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_metamathqa_json_list_and_jsonl(tmp_path):
  recs = [{"type": "GSM_AnsAug", "query": "Q1", "original_question": "Q1",
           "response": "2 + 2 = 4\n#### 4\nThe answer is: 4"},
          {"type": "MATH_AnsAug", "query": "Q2",
           "response": "So it is $\\frac{1}{2}$.\nThe answer is: \\frac{1}{2}"}]
  p = tmp_path / "MetaMathQA-395K.json"
  p.write_text(json.dumps(recs))
  got = formats.read_metamathqa(p)
  assert [g.answer for g in got] == ["4", "\\frac{1}{2}"]
  assert got[0].type == "GSM_AnsAug" and got[1].original_question == ""
  assert formats.read_metamathqa(_jsonl(tmp_path / "m.jsonl", recs)) == got


def test_gsm8k(tmp_path):
  p = _jsonl(tmp_path / "test.jsonl", [
      {"question": "How many?", "answer": "5 * 200 = <<5*200=1000>>1000\n#### 1,000"}])
  (ex,) = formats.read_gsm8k(p)
  assert (ex.query, ex.answer, ex.type) == ("How many?", "1,000", "gsm8k")


def test_hellaswag_harness_preprocessing(tmp_path):
  rec = {"ind": 7, "activity_label": "Home and Garden",
         "ctx_a": "[header] How to plant a tree [title] Dig a hole.",
         "ctx_b": "then", "endings": ["put the tree in  it.", "[step] eat it."],
         "label": "0"}
  (mc,) = formats.read_hellaswag(_jsonl(tmp_path / "h.jsonl", [rec]))
  # Worked by hand from the harness rule: " [title]" -> ". ", drop "[...]",
  # collapse double spaces, capitalize ctx_b.
  assert mc.contexts == ("Home and Garden: How to plant a tree. Dig a hole."
                         " Then",) * 2
  # The harness strips before deleting brackets, so "[step] eat it." keeps
  # its inner leading space (faithful, if odd).
  assert mc.continuations == (" put the tree in it.", "  eat it.")
  # acc_norm's choices: the harness's doc_to_choice, no target delimiter.
  assert mc.choices == ("put the tree in it.", " eat it.")
  assert (mc.label, mc.id, mc.benchmark) == (0, "7", "hellaswag")


def test_arc_both_layouts(tmp_path):
  ai2 = {"id": "x1", "question": {"stem": "Which is hot?", "choices": [
      {"text": "ice", "label": "A"}, {"text": "fire", "label": "B"}]},
         "answerKey": "B"}
  hf = {"id": "x1", "question": "Which is hot?",
        "choices": {"text": ["ice", "fire"], "label": ["A", "B"]},
        "answerKey": "B"}
  a = formats.read_arc(_jsonl(tmp_path / "a.jsonl", [ai2]))
  b = formats.read_arc(_jsonl(tmp_path / "b.jsonl", [hf]))
  assert a == b
  assert a[0].contexts[0] == "Question: Which is hot?\nAnswer:"
  assert a[0].continuations == (" ice", " fire") and a[0].label == 1
  assert a[0].choices == ("ice", "fire")


def test_winogrande_partial_scoring(tmp_path):
  rec = {"qID": "q", "sentence": "The cup fell off the table because _ was"
         " tilted.", "option1": "the cup", "option2": "the table",
         "answer": "2"}
  (mc,) = formats.read_winogrande(_jsonl(tmp_path / "w.jsonl", [rec]))
  assert mc.contexts == ("The cup fell off the table because the cup",
                         "The cup fell off the table because the table")
  assert mc.continuations == (" was tilted.",) * 2 and mc.label == 1
  # The harness's winogrande doc_to_choice: the filled-in contexts.
  assert mc.choices == mc.contexts


def test_read_text(tmp_path):
  p = tmp_path / "t.txt"
  p.write_text("doc one\nline two\n\n\n doc two \n")
  assert formats.read_text(p) == ["doc one\nline two", " doc two "]
  assert formats.read_text(_jsonl(tmp_path / "t.jsonl", [{"text": "a"},
                                                         {"text": "b"}])) == [
                                                             "a", "b"]


def test_malformed_json_names_file_and_record(tmp_path):
  p = tmp_path / "MetaMathQA-395K.json"
  p.write_text('[{"query": "a", "response": "The answer is: 1"},\n'
               ' {"query": "b", "response": oops}]')
  with pytest.raises(DataFormatError, match=re.escape(str(p)) + ": record 1:"
                     " malformed JSON"):
    formats.read_metamathqa(p)
  q = tmp_path / "g.jsonl"
  q.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": \n')
  with pytest.raises(DataFormatError, match=r"g\.jsonl: record 1 \(line 3\)"):
    formats.read_gsm8k(q)


@pytest.mark.parametrize("reader,record,field", [
    (formats.read_gsm8k, {"question": "q"}, "answer"),
    (formats.read_metamathqa, {"query": "q"}, "response"),
    (formats.read_hellaswag, {"ctx_a": "a", "ctx_b": "b", "activity_label": "x",
                              "label": 0}, "endings"),
    (formats.read_winogrande, {"sentence": "a _ b", "option1": "x",
                               "option2": "y"}, "answer"),
    (formats.read_arc, {"question": {"stem": "s", "choices": [
        {"text": "t", "label": "A"}]}, "answerKey": "C"}, "answerKey"),
])
def test_missing_or_bad_field_is_named(tmp_path, reader, record, field):
  p = _jsonl(tmp_path / "x.jsonl", [record])
  with pytest.raises(DataFormatError,
                     match=re.escape(f"x.jsonl: record 0: field {field!r}")):
    reader(p)


def test_empty_dataset_is_an_error(tmp_path):
  (tmp_path / "e.jsonl").write_text("\n")
  (tmp_path / "e.json").write_text("[]")
  with pytest.raises(DataFormatError, match="empty GSM8K dataset"):
    formats.read_gsm8k(tmp_path / "e.jsonl")
  with pytest.raises(DataFormatError, match="empty MetaMathQA dataset"):
    formats.read_metamathqa(tmp_path / "e.json")


def test_missing_file():
  with pytest.raises(FileNotFoundError, match="nope.json"):
    formats.read_metamathqa("/nonexistent/nope.json")


# ------------------------------------------------------------ synthetic data


def _independent_answer(p):
  """Recomputes a problem's answer from its question text alone."""
  q = p.question
  if p.template == "expression":
    expr = re.search(r"\$(.*)\$", q).group(1).replace(r"\times", "*")
    return eval(expr)  # pylint: disable=eval-used; our own generated digits.
  n = [int(x) for x in re.findall(r"\d+", q)]
  return {
      "add": lambda: n[0] + n[1], "sub": lambda: n[0] - n[1],
      "mul": lambda: n[0] * n[1], "wage": lambda: n[0] * n[1] * n[2],
      "give_buy": lambda: n[0] - n[1] + n[2], "boxes": lambda: n[0] * n[1] + n[2],
      "share": lambda: (n[0] * n[1] - n[2]) / n[3],
      "change": lambda: n[4] - (n[0] * n[1] + n[2] * n[3]),
  }[p.template]()


def test_synthetic_answers_verified_independently():
  problems = synthetic.generate_problems(600, seed=3,
                                         kinds=("word", "expression"))
  assert {p.level for p in problems} == {1, 2, 3}
  assert len({p.template for p in problems}) >= 8
  for p in problems:
    assert _independent_answer(p) == p.answer, p.question
    assert p.answer >= 0
  rec = synthetic.render_metamath(problems[0])
  with pytest.raises(ValueError, match="wrong step"):
    synthetic.verify_response(rec["response"].replace(
        f"= {problems[0].steps[0].result}", f"= {problems[0].steps[0].result + 1}",
        1), problems[0].answer)


def test_synthetic_files_read_back(tmp_path):
  paths = synthetic.write_all(str(tmp_path), n_train=200, n_test=30,
                              n_retention=12, seed=5)
  train = formats.read_metamathqa(paths["metamathqa"])
  test = formats.read_gsm8k(paths["gsm8k"])
  assert len(train) == 200 and len(test) == 30
  assert not {e.query for e in train} & {e.query for e in test}
  gsm = [e for e in train if e.type == "GSM_AnsAug"]
  assert gsm and all(re.search(r"#### (\d+)\nThe answer is: \1$", e.response)
                     for e in gsm)
  assert len(formats.read_hellaswag(paths["hellaswag"])) == 12
  assert len(formats.read_arc(paths["arc"])) == 12
  wg = formats.read_winogrande(paths["winogrande"])
  assert all(("big" in m.continuations[0]) == (m.contexts[m.label].endswith(
      m.contexts[0].split()[1])) for m in wg)
  # Same seed, same bytes.
  again = synthetic.write_all(str(tmp_path / "again"), n_train=200, n_test=30,
                              n_retention=12, seed=5)
  for k in paths:
    assert open(paths[k]).read() == open(again[k]).read()
