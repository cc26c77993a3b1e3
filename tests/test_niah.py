"""NIAH inputs: length budget, one needle at a sentence boundary at the depth, seeding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from longrecipe.evaluate import niah as niah_mod
from longrecipe.evaluate.haystack import NOISE, PromptFormat, sentence_ends
from longrecipe.evaluate.niah import (
    ANSWER_PREFIX,
    NEEDLE,
    TEMPLATE,
    HaystackError,
    corpus_haystack,
    depth_grid,
    essay_haystack,
    niah_samples,
    noise_haystack,
)
from longrecipe.models import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RULER_DATA = ROOT / "data/external/ruler"
HAS_ESSAYS = (RULER_DATA / "PaulGrahamEssays.json").exists()
MAX_NEW = 32


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _corpus():
    sentences = [f"Ada counts {n} boats near the mill. Bo paints lamps!" for n in range(400)]
    return corpus_haystack([" ".join(sentences[:200]), " ".join(sentences[200:])])


def _haystacks():
    out = [noise_haystack(), _corpus()]
    if HAS_ESSAYS:
        out.append(essay_haystack(RULER_DATA))
    return out


def _context(sample) -> str:
    """The haystack (with the needle) as it sits in the prompt."""
    head, _, rest = TEMPLATE.partition("{context}")
    tail = TEMPLATE.partition("{context}")[2].format(key=sample.key)
    tail += ANSWER_PREFIX.format(key=sample.key)
    assert sample.prompt.startswith(head) and sample.prompt.endswith(tail)
    return sample.prompt[len(head) : len(sample.prompt) - len(tail)]


@pytest.mark.parametrize("haystack", _haystacks(), ids=lambda h: h.name)
@pytest.mark.parametrize("length", [512, 1024])
def test_input_fills_the_length_budget(tok, haystack, length):
    fmt = PromptFormat("base", tok)
    for s in niah_samples(length, depth_grid(5), tok, haystack, max_new_tokens=MAX_NEW):
        n = len(tok(s.prompt)["input_ids"])
        assert n == s.n_input_tokens and n + MAX_NEW <= length
        # RULER's fitter: the largest haystack that fits, to one unit (a line or a word)
        more = niah_mod._builder(fmt, haystack, s.depth, s.key, s.references[0])
        assert fmt.count(more(s.haystack_units + 1)[0]) + MAX_NEW > length


@pytest.mark.parametrize("haystack", _haystacks(), ids=lambda h: h.name)
def test_one_needle_at_a_sentence_boundary_at_the_depth(tok, haystack):
    """RULER's placement: after int(sentences x depth / 100) sentences of a word haystack,
    before line int(lines x depth / 100) of the noise haystack."""
    samples = niah_samples(1024, depth_grid(11), tok, haystack, max_new_tokens=MAX_NEW)
    for s in samples:
        needle = NEEDLE.format(key=s.key, value=s.references[0])
        assert s.prompt.count(needle) == 1
        assert s.prompt.count(s.references[0]) == 1
        assert s.prompt.count(s.key) == 3  # the needle, the question, the answer prefix
        context = _context(s)
        at = context.index(needle)
        before = context[:at]
        if haystack.name == "noise":
            lines = context.split("\n")
            assert lines.index(needle) == int(s.haystack_units * s.depth / 100)
            assert set(lines) - {needle} <= {NOISE} and len(lines) == s.haystack_units + 1
            continue
        words = before.split()
        hay = words + context[at + len(needle):].split()
        assert len(hay) == s.haystack_units
        ends = [e for e in sentence_ends(hay) if e < len(hay)] + [len(hay)]
        # a sentence boundary: the start, or the end of a sentence of the haystack
        assert len(words) == 0 or len(words) in ends
        assert sum(e <= len(words) for e in ends) == int(len(ends) * s.depth / 100)


@pytest.mark.parametrize("haystack", _haystacks(), ids=lambda h: h.name)
def test_depths_land_where_asked(tok, haystack):
    samples = niah_samples(1024, depth_grid(10), tok, haystack, max_new_tokens=MAX_NEW)
    for s in samples:
        if haystack.name == "noise":
            units = s.haystack_units  # lines
        else:
            units = haystack.words.sentences_before(s.haystack_units, s.depth)[1]  # sentences
        # at the depth, moved back by less than one line or sentence
        assert 0 <= s.depth - s.needle_depth < 100 / units, s
    assert samples[0].needle_depth == 0.0 and samples[-1].needle_depth == 100.0


def test_same_seed_same_inputs_other_seed_other_needles(tok):
    a = niah_samples(512, depth_grid(3), tok, noise_haystack(), samples=2, seed=7)
    b = niah_samples(512, depth_grid(3), tok, noise_haystack(), samples=2, seed=7)
    c = niah_samples(512, depth_grid(3), tok, noise_haystack(), samples=2, seed=8)
    assert a == b
    assert [s.references for s in a] != [s.references for s in c]
    # within a cell, samples differ (each has its own key and number)
    assert a[0].references != a[1].references
    assert all(re.fullmatch(r"[1-9]\d{6}", s.references[0]) for s in a)


def test_too_short_a_length_is_a_clear_error(tok):
    with pytest.raises(HaystackError, match="length 300 is too short"):
        niah_samples(300, [50.0], tok, noise_haystack(), max_new_tokens=MAX_NEW)


def test_missing_essays_name_the_fetch_command(tmp_path):
    with pytest.raises(HaystackError, match="longrecipe data fetch ruler"):
        essay_haystack(tmp_path)


def test_depth_grid():
    assert depth_grid(1) == [50.0]
    assert depth_grid(5) == [0.0, 25.0, 50.0, 75.0, 100.0]
