"""Parity with RULER's own code: its metric functions, its prediction clean-up and its qa
document placement, loaded at test time from the `nvidia-long-context-eval` wheel that
`longrecipe data fetch ruler` keeps in data/external/ruler (never copied into this
project), run on the same rows as ours."""

from __future__ import annotations

import ast
import importlib
import random
import re
import sys
import types
import zipfile

import pytest

from longrecipe.data import ruler_wheel
from longrecipe.evaluate import ruler
from longrecipe.evaluate.metrics import score, task_score
from longrecipe.evaluate.stage import summarize
from longrecipe.models import byte_tokenizer

WHEEL = ruler_wheel()
pytestmark = pytest.mark.skipif(WHEEL is None, reason="run `longrecipe data fetch ruler`")

# Predictions as models write them (control characters, case, partial answers) with
# RULER's reference lists, including 3 and 7 references, where 1/3 x 100 and 100 x 1/3
# differ in the last bit.
ROWS = [
    ("all", "The special magic number is 1234567.", ["1234567"]),
    ("all", "  \x00 1234567\t7654321\x1f", ["1234567", "7654321", "5550000"]),
    ("all", "1234567", ["1234567", "7654321", "5550000"]),
    ("all", "QUIET-BEAR and Loud-Cat", ["quiet-bear", "loud-cat", "red-fox"]),
    ("all", "a b c d e", ["a", "b", "c", "x", "y", "z", "w"]),
    ("all", "12\x0034567", ["1234567"]),
    ("all", "", ["abc"]),
    ("all", "VAR ABCDE VAR FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"]),
    ("part", "It is paris.", ["Paris", "the city of Paris"]),
    ("part", "Lyon", ["Paris", "the city of Paris"]),
    ("part", "\x07Normandy\r\n", ["Normandy", "normandy", "Normandy"]),
]


def _module_from_wheel(name: str) -> types.ModuleType:
    sys.path.insert(0, str(WHEEL))  # zipimport: the wheel is a zip of the package
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(WHEEL))


def _function_from_wheel(member: str, function: str, namespace: dict) -> types.FunctionType:
    """One function of a RULER script whose module cannot be imported (it parses argv
    and needs NLTK at import): its definition, taken from the wheel, run alone."""
    with zipfile.ZipFile(WHEEL) as zf:
        source = zf.read(member).decode()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == function)
    code = compile(ast.Module(body=[node], type_ignores=[]), f"{WHEEL.name}/{member}", "exec")
    exec(code, namespace)
    return namespace[function]


@pytest.fixture(scope="module")
def ruler_metrics():
    return _module_from_wheel("long_context_eval.eval.synthetic.constants")


@pytest.fixture(scope="module")
def postprocess():
    fn = _function_from_wheel("long_context_eval/eval/evaluate.py", "postprocess_pred", {"re": re})
    return lambda text: fn(text, {})


def test_per_sample_scores_are_rulers_bit_for_bit(ruler_metrics, postprocess):
    per_sample = {"all": ruler_metrics.string_match_all_per_sample,
                  "part": ruler_metrics.string_match_part_per_sample}
    for metric, pred, refs in ROWS:
        want = per_sample[metric]([postprocess(pred)], [refs])[0]
        got = score(metric, pred, refs)
        assert got == want and type(got) is type(want), (metric, pred, refs, got, want)
    # The old arithmetic, 100 x found / n, is one ulp off RULER's on a third:
    assert 100.0 * 1 / 3 != ruler_metrics.string_match_all_per_sample(["a"], [["a", "b", "c"]])[0]


def test_task_scores_are_rulers_bit_for_bit(ruler_metrics, postprocess):
    task = {"all": ruler_metrics.string_match_all, "part": ruler_metrics.string_match_part}
    for metric in ("all", "part"):
        rows = [(p, r) for m, p, r in ROWS if m == metric]
        want = task[metric]([postprocess(p) for p, _ in rows], [r for _, r in rows])
        assert task_score(metric, [p for p, _ in rows], [r for _, r in rows]) == want
        # and what the evaluate stage writes into eval_summary
        table = _results(metric, rows)
        got = next(s for s in summarize(table).to_pylist() if s["task"] == "t")
        assert got["score"] == want, (metric, got["score"], want)


def _results(metric, rows):
    import pyarrow as pa

    from longrecipe.evaluate.stage import RESULTS_SCHEMA

    out = [dict(model="m", model_key="k", suite="ruler", task="t", length=64, depth=None,
                index=i, doc_id=None, prompt="", prediction=p, references=r, metric=metric,
                score=score(metric, p, r), value=None, n_input_tokens=1, n_output_tokens=1,
                stop="eos", seconds=0.0)
           for i, (p, r) in enumerate(rows)]
    return pa.Table.from_pylist(out, schema=RESULTS_SCHEMA)


def test_qa_gold_paragraph_sits_where_rulers_rule_puts_it(tmp_path):
    """RULER shuffles a qa prompt's documents with random.Random(seed): the gold
    paragraph's slot is a function of the seed and the number of documents, the same for
    every sample of a length. Ours drew a fresh layout per sample."""
    generate_input_output = _function_from_wheel(
        "long_context_eval/data/synthetic/qa.py", "generate_input_output",
        {"random": random, "DOCUMENT_PROMPT": ruler.QA_DOCUMENT},
    )
    data = _write_squad_like(tmp_path)
    tok = byte_tokenizer()
    samples = ruler.generate_samples("qa_1", 3072, tok, 6, 42, data)
    slots = set()
    for s in samples:
        docs = re.findall(r"Document \d+:\n(.*?)(?=\n\nDocument \d+:|\n\nAnswer the question)",
                          s.input, flags=re.S)
        gold = next(i for i, d in enumerate(docs) if s.references[0] in d)
        # RULER's own function, on stand-in documents, with the same count and seed
        g = generate_input_output.__globals__
        g["args"] = types.SimpleNamespace(random_seed=42, template="{context}|{query}")
        g["DOCS"] = [f"doc{i}" for i in range(1000)]
        g["QAS"] = [{"query": "q", "outputs": ["a"], "context": [0],
                     "more_context": list(range(1, 5))}]
        text, _ = generate_input_output(0, len(docs))
        theirs = re.findall(r"Document \d+:\n(doc\d+)", text).index("doc0")
        assert gold == theirs, (len(docs), gold, theirs)
        slots.add((len(docs), gold))
    assert len({n for n, _ in slots}) == len(slots)  # one slot per document count


def _write_squad_like(folder):
    import json

    paragraphs = [
        {"context": f"Paragraph {a}-{p} tells of old maps and blue boats. answer-{a}-{p}",
         "qas": [{"question": f"What is in {a}-{p}?", "id": f"{a}-{p}", "is_impossible": False,
                  "answers": [{"text": f"answer-{a}-{p}", "answer_start": 0}]}]}
        for a in range(8) for p in range(5)
    ]
    data = {"data": [{"title": f"t{a}", "paragraphs": paragraphs[a * 5 : a * 5 + 5]}
                     for a in range(8)]}
    (folder / "squad.json").write_text(json.dumps(data))
    return folder
