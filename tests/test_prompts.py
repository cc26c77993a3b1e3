"""Prompt forms (base, chat), the one BOS rule for prompts, and RULER's default of no stop
words: what the evaluated model is fed."""

from __future__ import annotations

import pytest

from longrecipe import EvaluateConfig, ModelSpec, TinyModelConfig, run_evaluate
from longrecipe.evaluate import ruler
from longrecipe.evaluate import stage as stage_mod
from longrecipe.evaluate import suites as suites_mod
from longrecipe.evaluate.haystack import PromptFormat
from longrecipe.evaluate.niah import TEMPLATE, niah_samples, noise_haystack
from longrecipe.models import byte_tokenizer
from longrecipe.tokens import encode, token_policy
from tests.conftest import QUIET
from tests.test_ruler import data_dir  # noqa: F401 (a fixture: RULER-format files we wrote)

# A chat template in the Llama-3 style: BOS text first, a header per turn.
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_tokenizer(add_bos: bool = True):
    tok = byte_tokenizer(add_bos)
    tok.chat_template = CHAT
    return tok


def test_bos_once_whatever_the_form():
    plain, bos = byte_tokenizer(), byte_tokenizer(add_bos=True)
    assert token_policy(plain).adds_bos is False and token_policy(bos).adds_bos is True
    assert encode(plain, "ab") == [64, 65]
    assert encode(bos, "ab") == [256, 64, 65]  # the tokenizer's own BOS, as at ingest
    chat = chat_tokenizer().apply_chat_template([{"role": "user", "content": "ab"}],
                                                tokenize=False, add_generation_prompt=True)
    ids = encode(chat_tokenizer(), chat)
    assert ids[0] == 256 and 256 not in ids[1:]  # the template's BOS, not a second one


def test_chat_form_wraps_the_task_and_keeps_the_answer_prefix(data_dir):  # noqa: F811
    tok = chat_tokenizer()
    for task in ("niah_single_1", "qa_1", "fwe"):
        base = ruler.generate_samples(task, 3072, tok, 1, 42, data_dir)[0]
        chat = ruler.generate_samples(task, 3072, tok, 1, 42, data_dir, prompt_format="chat")[0]
        assert chat.input.startswith("<|bos|><|user|>\n") and "<|end|>\n<|assistant|>\n" in chat.input
        answer = {"niah_single_1": " mentioned in the provided text is", "qa_1": " Answer:",
                  "fwe": " the three most frequently appeared words are:"}[task]
        assert base.input.endswith(answer) and chat.input.endswith(answer)
        # the same task text as the user turn (its haystack a little shorter: the template
        # takes tokens), the answer prefix after the assistant header
        user = chat.input.split("<|user|>\n", 1)[1].split("<|end|>\n<|assistant|>\n")[0]
        assert user[:60] == base.input[:60]
        tail = base.input[base.input.rindex("\n") :]  # the question line and answer prefix
        prefix = chat.input.rsplit("<|end|>\n<|assistant|>\n", 1)[1]
        assert tail.endswith(prefix) and (user + prefix).endswith(tail)
        assert chat.n_input_tokens == len(encode(tok, chat.input))
        assert chat.n_input_tokens + chat.max_new_tokens <= 3072
        assert chat.references == base.references
    # cwe's worked example becomes a turn of its own, answered by the assistant
    cwe = ruler.generate_samples("cwe", 3072, tok, 1, 42, data_dir, prompt_format="chat")[0]
    assert cwe.input.count("<|user|>") == 2 and cwe.input.count("<|assistant|>") == 2
    assert "are:1. " in cwe.input.split("<|assistant|>")[1]
    # vt's example stays inside the user turn, before the task, as RULER inserts it
    vt = ruler.generate_samples("vt", 3072, tok, 1, 42, data_dir, prompt_format="chat")[0]
    assert vt.input.count("<|user|>") == 1 and vt.input.index("they are:  ") < vt.input.index("<|end|>")


def test_chat_needs_a_chat_template(data_dir, store, tiny_spec):  # noqa: F811
    with pytest.raises(ruler.RulerError, match="no chat template"):
        ruler.generate_samples("qa_1", 2048, byte_tokenizer(), 1, 42, data_dir, prompt_format="chat")
    cfg = EvaluateConfig(suites=["niah"], lengths=[512], depths=1, prompt_format="chat")
    with pytest.raises(stage_mod.EvaluateError, match="no chat template"):
        run_evaluate(cfg, {"base": tiny_spec}, store, QUIET)


def test_niah_chat_form_fits_and_counts_bos_once():
    tok = chat_tokenizer()
    for s in niah_samples(1024, [0.0, 50.0, 100.0], tok, noise_haystack(), max_new_tokens=16,
                          prompt_format="chat"):
        assert s.prompt.startswith("<|bos|><|user|>\n" + TEMPLATE.partition("{context}")[0])
        assert s.n_input_tokens == len(encode(tok, s.prompt)) <= 1024 - 16
    assert PromptFormat("base", tok).render("T", " A") == "T A"


def test_no_stop_words_by_default(store, monkeypatch):
    """RULER generates with no stop words; our default stopped the single-answer tasks at
    a newline."""
    seen = []

    def fake_generate(self, prompts, max_new, stop_at_newline):
        seen.append(stop_at_newline)
        return real(self, prompts, max_new, stop_at_newline)

    real = suites_mod.SuiteRunner._generate
    monkeypatch.setattr(suites_mod.SuiteRunner, "_generate", fake_generate)
    assert EvaluateConfig().stop_at_newline is False
    spec = ModelSpec(tiny=TinyModelConfig(max_position_embeddings=256))
    run_evaluate(EvaluateConfig(suites=["niah"], lengths=[512], depths=1, niah_max_new_tokens=4),
                 {"base": spec}, store, QUIET)
    assert seen == [False]
    run_evaluate(EvaluateConfig(suites=["niah"], lengths=[512], depths=1, niah_max_new_tokens=4,
                                stop_at_newline=True), {"base": spec}, store, QUIET)
    assert seen == [False, True]
