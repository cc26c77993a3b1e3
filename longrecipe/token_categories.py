"""A coarse category for every token type, so `token_stats` shows which kinds of tokens
are impactful, as the paper's part-of-speech figure does (numerals, pronouns,
conjunctions...).

No tagger: a token type has no sentence around it, and no tagger data can be
fetched here. The rule looks at the decoded token alone, in this order:

1. `special`: a special token of the tokenizer (BOS, EOS, pad, chat markers).
2. `space`: only whitespace (spaces, newlines).
3. `number`: holds a digit ("7", " 2024", "3rd"), or is a whole English number
   word ("one" .. "twelve", "hundred", ...; "whole" as in 5).
4. `punctuation`: only punctuation and symbols (Unicode categories P and S).
5. a closed-class English word, the token's letters lower-cased and matched
   whole against our own short lists: `pronoun`, `determiner`, `conjunction`,
   `adposition`, `auxiliary` (a word in two lists takes the first of these).
   Only a token that starts a word counts (a leading space or word-start mark,
   a capital letter, or an apostrophe: "'s"); "in" inside "in|side" does not.
6. `word`: letters (apostrophes allowed) that begin a word (the token starts
   with a space or a word-start mark, or is title-case: "Enter" after "[")
   and are in none of the lists.
7. `subword`: letters that continue a word (no word start: "ing", "ed", the
   "EL" of "HELENA").
8. `other`: anything else (mixed letters and symbols, bytes of a multi-byte
   character).

The lists hold the common English forms only, so "that" (determiner, pronoun or
conjunction in a sentence) is counted once, as a determiner; for other languages
the closed classes stay empty and their words count as `word` or `subword`.
"""

from __future__ import annotations

import unicodedata

CATEGORIES = (
    "special", "space", "number", "punctuation", "pronoun", "determiner", "conjunction",
    "adposition", "auxiliary", "word", "subword", "other",
)

_NUMBER_WORDS = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
hundred thousand million billion first second third fourth fifth sixth seventh eighth ninth
tenth half twice dozen
""".split())

# Closed-class English words, written for this module (no downloaded data).
_CLOSED: dict[str, frozenset[str]] = {
    "pronoun": frozenset("""
i me my mine myself you your yours yourself yourselves he him his himself she her hers
herself it its itself we us our ours ourselves they them their theirs themselves who whom
whose what which whoever whatever someone somebody something anyone anybody anything
everyone everybody everything nobody nothing none thee thou thy thine ye
""".split()),
    "determiner": frozenset("""
the a an this that these those each every either neither some any no all both few many
much more most several such another other own
""".split()),
    "conjunction": frozenset("""
and or but nor yet so because although though while whereas unless if whether than since
once until till lest whenever wherever however therefore thus hence also
""".split()),
    "adposition": frozenset("""
of in on at by for with from to into onto upon about above across after against along among
around before behind below beneath beside besides between beyond during except inside near
off out outside over past per through throughout toward towards under underneath unlike up
upon via within without
""".split()),
    "auxiliary": frozenset("""
be am is are was were been being have has had having do does did done doing will would shall
should can could may might must ought 's 're 've 'd 'll 'm n't not
""".split()),
}

# Markers some tokenizers put in a token's text for a word start (SentencePiece, GPT-2 BPE).
_WORD_START = ("\u2581", "\u0120")


def token_category(text: str, special: bool = False) -> str:
    """The category of one token from its decoded text (rule in the module docstring)."""
    if special:
        return "special"
    if text == "" or text.isspace():
        return "space" if text else "other"
    starts_word = text[0].isspace() or text.startswith(_WORD_START)
    core = text.strip().lstrip("".join(_WORD_START))
    if any(c.isdigit() for c in core):
        return "number"
    if core and all(unicodedata.category(c)[0] in "PS" for c in core):
        return "punctuation"
    word = core.lower().replace("\u2019", "'")
    # A whole word only: a piece that continues a word ("in" of "in|side") is lower-case
    # and has no word-start mark; a capitalised one ("The" after a newline) starts a word.
    whole = starts_word or core[:1].isupper() or word.startswith("'")
    if whole and word in _NUMBER_WORDS:
        return "number"
    for name, words in _CLOSED.items():
        if whole and word in words:
            return name
    letters = word.replace("'", "")
    if letters.isalpha():
        title = core[:1].isupper() and core[1:].islower()  # "Enter" after "[", "The"
        return "word" if starts_word or title else "subword"
    return "other"


def categories(tok, token_ids) -> list[str]:
    """The category of each token id under tokenizer `tok`."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    return [token_category(tok.decode([int(t)]), int(t) in special) for t in token_ids]
