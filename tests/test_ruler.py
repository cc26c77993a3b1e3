"""RULER input generators: length budget, needles, references, seeds, errors.

Unit tests run on small data files written here in RULER's formats (no fetched data)
with the tiny model's byte tokenizer; the `slow` test uses the fetched essays and
paragraphs and the demo model's tokenizer.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from longrecipe.evaluate import haystack, ruler
from longrecipe.evaluate.ruler import (
    NOISE,
    RULER_TASKS,
    RulerError,
    RulerLengthError,
    RulerSample,
    generate_samples,
)
from longrecipe.models import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_GGUF = ROOT / "data/external/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RULER_DATA = ROOT / "data/external/ruler"

LENGTHS = (2048, 3072)  # bytes = tokens with the byte tokenizer; cwe switches rules at 4096


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Essays, SQuAD and HotpotQA files in RULER's formats, with text we wrote ourselves."""
    d = tmp_path_factory.mktemp("ruler")
    rng = random.Random(0)
    subjects = ["The painter", "A sailor", "Dr. Lee", "Our town", "Every clock", "J. R. Smith"]
    verbs = ["keeps", "finds", "sells", "counts", "paints", "mends"]
    things = ["old maps", "blue boats", "small coins", "tall lamps", "grey stones"]
    sentences = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(things)}{rng.choice('..!?')}"
        for _ in range(3000)
    ]
    (d / "PaulGrahamEssays.json").write_text(json.dumps({"text": "  ".join(sentences)}))

    def paragraph(i: int) -> str:
        return (
            f"Paragraph {i} tells that "
            + " ".join(rng.choice(things) for _ in range(rng.randint(3, 12)))
            + "."
        )

    squad = {"version": "v2.0", "data": []}
    for a in range(6):
        paras = []
        for p in range(5):
            qas = [
                {
                    "question": f"What is in article {a} paragraph {p}?",
                    "id": f"{a}-{p}",
                    "answers": [{"text": f"answer-{a}-{p}", "answer_start": 0}] * 2,
                    "is_impossible": False,
                },
                {
                    "question": "Unanswerable?",
                    "id": f"{a}-{p}-x",
                    "answers": [],
                    "is_impossible": True,
                },
            ]
            paras.append({"context": paragraph(a * 5 + p) + f" answer-{a}-{p}", "qas": qas})
        squad["data"].append({"title": f"t{a}", "paragraphs": paras})
    (d / "squad.json").write_text(json.dumps(squad))

    hotpot = [
        {
            "_id": str(q),
            "question": f"Which stone did question {q} ask for?",
            "answer": f"stone-{q}",
            "supporting_facts": [[f"T{q}-0", 0]],
            "context": [
                [f"T{q}-{k}", [paragraph(100 + q * 10 + k), f" stone-{q}." if k == 0 else ""]]
                for k in range(10)
            ],
            "type": "bridge",
            "level": "easy",
        }
        for q in range(40)
    ]
    (d / "hotpotqa.json").write_text(json.dumps(hotpot))
    return d


def unit_tokens(task: str, data_dir: Path) -> int:
    """Tokens (bytes) of the largest haystack unit of a task: how far under the budget a
    maximal fit may stay."""
    needle = len("One of the special magic numbers for " + "x" * 40 + " is: " + "x" * 36 + ".\n")
    if task == "niah_single_1" or task == "vt":
        return len(NOISE) + 2
    if task in ("niah_multikey_2", "niah_multikey_3"):
        return needle
    if task.startswith("niah"):  # one essay word (and the needles it may shift)
        return 30
    if task == "cwe":  # one more rare word: a numbered entry per repeat
        return 40
    if task == "fwe":  # one more unit of the Zipf total: a few coded words
        return 30
    paras = [
        p["context"]
        for a in json.loads((data_dir / "squad.json").read_text())["data"]
        for p in a["paragraphs"]
    ]
    return max(len(p) for p in paras) + len("Document 00:\n\n\n")


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", RULER_TASKS)
def test_every_task_fills_the_budget(task, length, tok, data_dir):
    samples = generate_samples(task, length, tok, 3, 42, data_dir)
    assert [s.index for s in samples] == [0, 1, 2]
    for s in samples:
        assert isinstance(s, RulerSample) and s.task == task
        assert s.n_input_tokens == len(tok(s.input)["input_ids"])
        total = s.n_input_tokens + s.max_new_tokens
        assert total <= length
        assert total >= length - unit_tokens(task, data_dir), (task, total)
        assert s.references and all(isinstance(r, str) and r for r in s.references)
    expected = {
        "vt": (30, "all"),
        "cwe": (120, "all"),
        "fwe": (50, "all"),
        "qa_1": (32, "part"),
        "qa_2": (32, "part"),
    }
    assert (samples[0].max_new_tokens, samples[0].metric) == expected.get(task, (128, "all"))


def test_too_short_length_is_a_clear_error(tok, data_dir):
    with pytest.raises(RulerLengthError, match="qa_2: length 600 is too short"):
        generate_samples("qa_2", 600, tok, 1, 42, data_dir)
    assert issubclass(RulerLengthError, RulerError)


# --------------------------------------------------------------------------- niah


def context_of(sample: RulerSample) -> str:
    head = "I will quiz you about the "
    start = sample.input.index("\n", sample.input.index(head)) + 1
    return sample.input[start : sample.input.rindex("\nWhat ")]


NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


@pytest.mark.parametrize(
    "task, keys, values, queries",
    [
        ("niah_single_1", 1, 1, 1),
        ("niah_single_2", 1, 1, 1),
        ("niah_single_3", 1, 1, 1),
        ("niah_multikey_1", 4, 1, 1),
        ("niah_multikey_2", 1, 1, 1),
        ("niah_multikey_3", 1, 1, 1),
        ("niah_multivalue", 1, 4, 1),
        ("niah_multiquery", 4, 1, 4),
    ],
)
def test_niah_needles_and_references(task, keys, values, queries, tok, data_dir):
    for s in generate_samples(task, 3072, tok, 4, 7, data_dir):
        question = s.input[s.input.rindex("\nWhat ") :]
        found = NEEDLE_RE.findall(context_of(s))
        asked = re.search(r" for (.+) mentioned in the provided text\?", question).group(1)
        asked = re.split(r", and |, ", asked)
        assert len(asked) == queries and len(s.references) == queries * values
        # Every asked key's needles are there once each, and they carry the references.
        for key in asked:
            mine = [v for _, k, v in found if k == key]
            assert len(mine) == values and len(set(mine)) == values
        assert sorted(v for _, k, v in found if k in asked) == sorted(s.references)
        for ref in s.references:
            assert s.input.count(ref) == 1
        # Keys that are not asked about: the other needles of a multi-key task.
        distinct_keys = {k for _, k, _ in found}
        if task.startswith("niah_multikey_2") or task.startswith("niah_multikey_3"):
            assert len(distinct_keys) == len(found) > 1  # a haystack of distractor needles
        else:
            assert len(distinct_keys) == keys and len(found) == keys * values
        value_type = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
        assert all(t == value_type for t, _, _ in found)
        if value_type == "numbers":
            assert all(re.fullmatch(r"\d{7}", r) for r in s.references)
        else:
            assert all(
                re.fullmatch(
                    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", r
                )
                for r in s.references
            )
        single = queries * values == 1
        assert s.input.startswith("A special magic" if single else "Some special magic")
        assert s.input.endswith(" mentioned in the provided text " + ("is" if single else "are"))


def test_essay_needles_sit_at_sentence_boundaries(tok, data_dir):
    for task in ("niah_single_2", "niah_multivalue"):
        for s in generate_samples(task, 3072, tok, 4, 3, data_dir):
            context = context_of(s)
            for m in NEEDLE_RE.finditer(context):
                before = context[: m.start()].rstrip()
                after = NEEDLE_RE.sub("", context[m.end() :]).strip()
                # After a sentence end, at the start, or at the very end (depth 100: after
                # the last sentence, which the length may have cut short).
                assert (
                    before == ""
                    or before[-1] in ".!?"
                    or NEEDLE_RE.search(before[-60:])
                    or after == ""
                )


def test_essay_depths_follow_the_sentence_count():
    essay = haystack.WordHaystack("One aa. Two bb.\n Three cc. Four dd.  Five ee.")  # 5 sentences
    assert essay.ends == [2, 4, 6, 8]
    text = essay.with_needles(10, ["N0", "N50", "N100"], [0, 50, 100])
    assert text == "N0 One aa. Two bb. N50 Three cc. Four dd. Five ee. N100"
    # A prefix that ends inside a sentence counts it as the last sentence.
    assert essay.with_needles(5, ["X"], [100]) == "One aa. Two bb. Three X"
    assert essay.with_needles(5, ["X"], [39]) == "One aa. X Two bb. Three"
    assert len(ruler.DEPTHS) == 40 and ruler.DEPTHS[0] == 0 and ruler.DEPTHS[-1] == 100


def test_sentence_split_skips_abbreviations_and_initials():
    words = "Dr. Lee met J. R. Smith. Then e.g. nothing. Done! ok. Next".split(" ")
    ends = haystack.sentence_ends(words)
    assert [words[e - 1] for e in ends] == ["Smith.", "nothing.", "ok."]  # not "Done!" before "ok."


# --------------------------------------------------------------------------- vt, cwe, fwe


def test_vt_chain_and_answer(tok, data_dir):
    for s in generate_samples("vt", 3072, tok, 3, 5, data_dir):
        names = s.references
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        main = s.input[s.input.rindex("Memorize and track") :]
        value = re.search(rf"VAR {names[0]} = (\d{{5}})", main).group(1)
        for prev, nxt in zip(names, names[1:], strict=False):
            assert main.count(f"VAR {nxt} = VAR {prev} ") == 1
        assert main.index(f"VAR {names[0]} =") < main.index(f"VAR {names[-1]} =")
        assert f"assigned the value {value} in the text" in main
        assert main.endswith(f"5 variables are assgined the value {value}, they are: ")
        # One worked example (3-letter names, with its answer) comes first.
        example = s.input[: s.input.rindex("Memorize and track")]
        assert example.startswith(" Memorize and track") and example.endswith("\n\n\n\n")
        answer = re.search(r"they are:  ([A-Z]{3}(?: [A-Z]{3}){4})\n", example).group(1).split()
        assert all(f"VAR {n} =" in example for n in answer)


def cwe_counts(sample: RulerSample) -> Counter:
    main = sample.input[sample.input.rindex("Memorize the ones that appear most often.\n") :]
    listing = main.split("\n")[1]
    return Counter(re.findall(r"\d+\. (.+?)(?= \d+\. |$)", listing))


@pytest.mark.parametrize("length, common, rare", [(3072, 6, 1), (8192, 30, 3)])
def test_cwe_common_words_repeat_more(length, common, rare, tok, data_dir):
    s = generate_samples("cwe", length, tok, 1, 1, data_dir)[0]
    counts = cwe_counts(s)
    assert len(s.references) == 10
    assert {counts[w] for w in s.references} == {common}
    others = [c for w, c in counts.items() if w not in s.references]
    assert others and set(others) == {rare}
    # The worked example's answer is appended right after its answer prefix.
    assert re.search(r"most often in the list are:1\. \S+ 2\. ", s.input)


def test_fwe_references_are_the_next_three_most_frequent(tok, data_dir):
    for length in LENGTHS:
        for s in generate_samples("fwe", length, tok, 3, 9, data_dir):
            coded = s.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
            ranked = Counter(coded).most_common()
            assert ranked[0][0] == "..."
            assert [w for w, _ in ranked[1:4]] == s.references
            assert ranked[3][1] > ranked[4][1]  # no tie with the fourth coded word
            assert all(re.fullmatch(r"[a-z]{6}", w) for w in s.references)


# --------------------------------------------------------------------------- qa


def test_qa_keeps_gold_paragraphs_and_answers(tok, data_dir):
    s1 = generate_samples("qa_1", 3072, tok, 3, 42, data_dir)
    # RULER takes the answerable SQuAD questions in file order; answers deduplicated.
    assert [s.references for s in s1] == [["answer-0-0"], ["answer-0-1"], ["answer-0-2"]]
    for s in s1:
        assert s.input.endswith("?" + " Answer:")
        docs = re.findall(r"Document (\d+):\n", s.input)
        assert docs == [str(i + 1) for i in range(len(docs))] and len(docs) > 1
        assert s.references[0] in s.input
    s2 = generate_samples("qa_2", 3072, tok, 2, 42, data_dir)
    assert [s.references for s in s2] == [["stone-0"], ["stone-1"]]
    for q, s in enumerate(s2):
        for k in range(10):  # all ten paragraphs of the HotpotQA item are kept
            assert f"T{q}-{k}\nParagraph" in s.input


# --------------------------------------------------------------------------- seeds


def test_same_seed_same_inputs_and_samples_independent_of_n(tok, data_dir):
    for task in RULER_TASKS:
        a = generate_samples(task, 2048, tok, 3, 11, data_dir)
        assert a == generate_samples(task, 2048, tok, 3, 11, data_dir)
        assert generate_samples(task, 2048, tok, 1, 11, data_dir)[0] == a[0]
        other = generate_samples(task, 2048, tok, 3, 12, data_dir)
        assert [s.input for s in other] != [s.input for s in a]
        assert len({s.input for s in a}) == 3


# --------------------------------------------------------------------------- search


def test_fit_finds_the_largest_count_in_few_steps():
    calls = []

    def count(text: str) -> int:
        calls.append(len(text))
        return len(text)

    def build(k: int) -> tuple[str, list[str]]:
        return "x" * (100 + 7 * k + (k * 13) % 5), []  # roughly linear, not exactly monotone

    k, text, _, n = haystack.fit(build, count, 5000, 0, 10_000, None)
    assert n == len(text) <= 5000
    assert len(build(k + 1)[0]) > 5000 or 5000 - n < 7  # k + 1 does not fit, or under a unit left
    first = len(calls)
    calls.clear()
    k2, *_ = haystack.fit(build, count, 5000, 0, 10_000, guess=k)
    assert k2 == k and len(calls) <= 3 < first  # from the previous answer: a check or two
    with pytest.raises(haystack.TooShort):
        haystack.fit(build, count, 50, 0, 10_000, None)
    assert haystack.fit(build, count, 10**9, 0, 20, None)[0] == 20  # capped at hi


# --------------------------------------------------------------------------- errors


def test_bad_task_and_missing_or_bad_data(tok, data_dir, tmp_path):
    with pytest.raises(RulerError, match="unknown RULER task 'niah'"):
        generate_samples("niah", 2048, tok, 1, 42, data_dir)
    with pytest.raises(
        RulerError, match="squad.json is missing: run `longrecipe data fetch ruler`"
    ):
        generate_samples("qa_1", 2048, tok, 1, 42, tmp_path)
    (tmp_path / "PaulGrahamEssays.json").write_text("[1, 2")
    with pytest.raises(RulerError, match="PaulGrahamEssays.json: cannot read it as JSON"):
        generate_samples("niah_single_2", 2048, tok, 1, 42, tmp_path)
    (tmp_path / "hotpotqa.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(RulerError, match="hotpotqa.json: not in the hotpotqa format"):
        generate_samples("qa_2", 2048, tok, 1, 42, tmp_path)
    with pytest.raises(RulerError, match="has 30 questions, sample 30 asked for"):
        generate_samples("qa_1", 2048, tok, 31, 42, data_dir)


# --------------------------------------------------------------------------- real tokenizer


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEMO_GGUF.exists() and RULER_DATA.is_dir()), reason="run `longrecipe data fetch all`"
)
def test_demo_tokenizer_and_real_data_fit_tightly():
    from longrecipe import ModelSpec
    from longrecipe.models import load_tokenizer

    tok = load_tokenizer(ModelSpec(source=str(DEMO_GGUF)))
    slack = {
        "niah_single_2": 8,
        "niah_multikey_2": 60,
        "vt": 40,
        "cwe": 40,
        "fwe": 20,
        "qa_1": 400,
        "qa_2": 600,
    }
    for task, room in slack.items():
        for s in generate_samples(task, 4096, tok, 3, 42, RULER_DATA):
            total = len(tok(s.input)["input_ids"]) + s.max_new_tokens
            assert s.n_input_tokens + s.max_new_tokens == total
            assert 4096 - room <= total <= 4096, (task, total)
    gold = generate_samples("qa_1", 4096, tok, 1, 42, RULER_DATA)[0]
    assert gold.references == ["France"] and "Normandy" in gold.input
