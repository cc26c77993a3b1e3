"""RULER's data files as the task generators read them: the essays, and the SQuAD and
HotpotQA questions with their paragraphs (RULER's read_squad / read_hotpotqa rules),
each parsed once per file version. Fetched by `longrecipe data fetch ruler`."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from longrecipe.errors import InputError
from longrecipe.evaluate.haystack import WordHaystack


class RulerError(InputError):
    """A RULER task that cannot be generated: unknown task, missing or malformed data."""


@dataclass(frozen=True)
class Question:
    query: str
    answers: list[str]
    gold: list[int]  # paragraphs that must be in the prompt
    related: list[int]  # other paragraphs of the same article (SQuAD), preferred as filler


def essay(data_dir: Path) -> WordHaystack:
    """Paul Graham's essays as a word haystack."""
    path = _data_file(data_dir, "PaulGrahamEssays.json")
    return _essay_cached(path, path.stat().st_mtime)


@functools.cache
def _essay_cached(path: Path, mtime: float) -> WordHaystack:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise RulerError(f"{path}: expected a JSON object with a string field 'text'")
    return WordHaystack(data["text"])


def qa_data(data_dir: Path, dataset: str) -> tuple[list[Question], list[str]]:
    """(answerable questions in file order, every distinct paragraph, sorted) of a dataset."""
    path = _data_file(data_dir, f"{dataset}.json")
    return _qa_cached(path, path.stat().st_mtime, dataset)


@functools.cache
def _qa_cached(path: Path, mtime: float, dataset: str) -> tuple[list[Question], list[str]]:
    data = _load_json(path)
    try:
        return _read_squad(data) if dataset == "squad" else _read_hotpotqa(data)
    except (KeyError, TypeError, AttributeError) as e:
        raise RulerError(
            f"{path}: not in the {dataset} format RULER uses ({type(e).__name__}: {e})"
        ) from None


def _read_squad(data) -> tuple[list[Question], list[str]]:
    articles = data["data"]
    docs = sorted({p["context"] for a in articles for p in a["paragraphs"]})
    idx = {d: i for i, d in enumerate(docs)}
    questions = []
    for a in articles:
        in_article = [idx[p["context"]] for p in a["paragraphs"]]
        for p in a["paragraphs"]:
            gold = idx[p["context"]]
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                answers = list(dict.fromkeys(x["text"] for x in qa["answers"]))
                related = [i for i in in_article if i != gold]
                questions.append(Question(qa["question"], answers, [gold], related))
    return questions, docs


def _read_hotpotqa(data) -> tuple[list[Question], list[str]]:
    def doc(title, sentences) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for item in data for t, s in item["context"]})
    idx = {d: i for i, d in enumerate(docs)}
    # Every paragraph of a HotpotQA item (2 supporting, the rest distractors) is gold, as in RULER.
    questions = [
        Question(
            item["question"], [item["answer"]], [idx[doc(t, s)] for t, s in item["context"]], []
        )
        for item in data
    ]
    return questions, docs


# --------------------------------------------------------------------------- data files


def _data_file(data_dir: Path, name: str) -> Path:
    path = Path(data_dir) / name
    if not path.is_file():
        raise RulerError(f"RULER data file {path} is missing: run `longrecipe data fetch ruler`")
    return path.resolve()


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise RulerError(f"{path}: cannot read it as JSON ({e})") from None
