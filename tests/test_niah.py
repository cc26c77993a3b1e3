"""NIAH inputs: length budget, one needle at a sentence boundary at the depth, seeding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
SENTENCE_START = re.compile(r"[.!?][\"')\]]*(?:\s+|(?=[A-Z]))")


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
    for s in niah_samples(length, depth_grid(5), tok, haystack, max_new_tokens=MAX_NEW):
        n = len(tok(s.prompt)["input_ids"])
        assert n == s.n_input_tokens
        # input plus tokens to generate fit the length, to within a few tokens
        assert length - 4 <= n + MAX_NEW <= length


@pytest.mark.parametrize("haystack", _haystacks(), ids=lambda h: h.name)
def test_one_needle_at_a_sentence_boundary_at_or_before_the_depth(tok, haystack):
    samples = niah_samples(1024, depth_grid(11), tok, haystack, max_new_tokens=MAX_NEW)
    for s in samples:
        needle = NEEDLE.format(key=s.key, value=s.references[0])
        assert s.prompt.count(needle) == 1
        assert s.prompt.count(s.references[0]) == 1
        assert s.prompt.count(s.key) == 3  # the needle, the question, the answer prefix
        context = _context(s)
        at = context.index(needle)
        before, after = context[:at], context[at + len(needle) :]
        # A sentence boundary: the start, or end punctuation then a space or newline.
        assert at == 0 or re.search(r"[.!?][\"')\]]*\s$", before), before[-30:]
        # The needle sits at the last sentence start at or before the requested depth:
        # no sentence starts between the needle and the depth's token.
        hay = before + after[1:]  # the haystack without the needle and its separator
        ends = [e for _, e in tok(hay, add_special_tokens=False,
                                  return_offsets_mapping=True)["offset_mapping"]]
        j = min(len(ends), round(s.haystack_tokens * s.depth / 100))
        depth_char = ends[j - 1] if j else 0
        assert len(before) <= depth_char + 1
        starts = [m.end() for m in SENTENCE_START.finditer(hay)]
        assert not [c for c in starts if len(before) < c <= depth_char], s.depth


def test_depths_land_where_asked_on_the_noise_haystack(tok):
    # Noise sentences are at most 22 tokens: every needle is within a sentence of its depth.
    samples = niah_samples(1024, depth_grid(10), tok, noise_haystack(), max_new_tokens=MAX_NEW)
    for s in samples:
        assert s.depth - 100 * 23 / s.haystack_tokens <= s.needle_depth <= s.depth + 0.5


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
