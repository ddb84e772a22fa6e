"""Tokenizers: sentencepiece trained on the synthetic corpus, HF tokenizer folders."""

import json

import pytest

from r1jax.data import synthetic
from r1jax.data.templates import R1_TAGS
from r1jax.data.tokenizer import HFTokenizer, Tokenizer, load_hf_tokenizer, train_sentencepiece

TEXTS = [
    "héllo\nwörld  двa  spaces 中文 12345",
    " leading and trailing ",
    "<think> 7+5=12 </think> <answer> 12",
]


@pytest.fixture(scope="module")
def corpus():
    return synthetic.corpus(600, seed=0, mix_fraction=0.2)


@pytest.fixture(scope="module")
def spm_tok(corpus, tmp_path_factory):
    return train_sentencepiece(corpus, 400, tmp_path_factory.mktemp("spm"))


def test_sentencepiece_round_trips_and_special_ids(spm_tok, corpus):
    assert isinstance(spm_tok, Tokenizer)
    assert (spm_tok.pad_id, spm_tok.unk_id, spm_tok.bos_id, spm_tok.eos_id) == (0, 1, 2, 3)
    assert spm_tok.vocab_size <= 400
    for text in [*corpus[:20], *TEXTS]:
        ids = spm_tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == spm_tok.bos_id and ids[-1] == spm_tok.eos_id
        assert spm_tok.decode(ids) == text
        assert max(ids) < spm_tok.vocab_size


def test_sentencepiece_tags_and_digits_are_single_tokens(spm_tok):
    for tag in (*R1_TAGS, "|special_token|"):
        ids = spm_tok.encode(tag)
        assert spm_tok.piece_to_id(tag) in ids and len([i for i in ids if spm_tok.id_to_piece(i) != "▁"]) == 1
    pieces = [spm_tok.id_to_piece(i) for i in spm_tok.encode("12*345=4140")]
    assert [p for p in pieces if p != "▁"] == list("12*345=4140")


def test_sentencepiece_training_is_deterministic_and_cached(spm_tok, corpus, tmp_path):
    again = train_sentencepiece(corpus, 400, tmp_path / "a")
    with open(spm_tok.model_file, "rb") as f, open(again.model_file, "rb") as g:
        assert f.read() == g.read()
    mtime = (tmp_path / "a" / "spm.model").stat().st_mtime_ns
    train_sentencepiece(corpus, 400, tmp_path / "a")  # same inputs: loaded, not retrained
    assert (tmp_path / "a" / "spm.model").stat().st_mtime_ns == mtime
    changed = r"spm.model was trained on other inputs \(600 texts, now 300; options changed: none\)"
    with pytest.raises(ValueError, match=changed):
        train_sentencepiece(corpus[:300], 400, tmp_path / "a")  # changed corpus: the model stays
    assert (tmp_path / "a" / "spm.model").stat().st_mtime_ns == mtime
    train_sentencepiece(corpus[:300], 400, tmp_path / "a", overwrite=True)  # unless asked to replace it
    assert (tmp_path / "a" / "spm.model").stat().st_mtime_ns != mtime
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(corpus, 100, tmp_path / "b")


def _hf_folder(tmp_path, chat_template):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    specials = ["<unk>", "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator(
        synthetic.corpus(200, seed=0, template=None) + TEXTS,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>", "chat_template": chat_template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|pad|>"}))
    return tmp_path


def test_hf_tokenizer_folder(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok = load_hf_tokenizer(_hf_folder(tmp_path, template))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Q"}])
    assert prompt == "<|bos|><|user|>Q<|assistant|>"
    from r1jax.data.templates import format_prompt

    assert format_prompt("chat", "Q", tokenizer=tok) == prompt
    assert tok.encode(prompt)[:2] == [1, 4]  # specials in the rendered text map to their ids, no extra BOS
    assert tok.encode(prompt, add_bos=True)[:2] == [1, 4]  # nor when the pipeline asks for one (a second BOS)
    assert tok.encode("Q", add_bos=True)[0] == 1


def test_sft_completion_ids_are_the_sampled_ids_after_a_prompt(tmp_path):
    """A sampled completion, decoded and encoded again for SFT (rejection sampling, distillation), gives
    the ids the model drew: byte-level BPE keeps the space drawn after "Assistant:", which must not be
    doubled; a text without it (a user's trace) is joined by one; a chat prompt ends in a newline."""
    from r1jax.data.templates import format_prompt
    from r1jax.stages_r1 import completion_ids

    tok = load_hf_tokenizer(_hf_folder(tmp_path, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"))
    prompt = format_prompt("r1_zero", "What is 2 + 3?")
    prompt_ids = tok.encode(prompt)
    drawn = tok.encode(prompt + " <think> 2 + 3 = 5 </think> <answer> 5 </answer>")[len(prompt_ids):]
    assert tok.encode(prompt + tok.decode(drawn)) == prompt_ids + drawn  # the decoded text keeps the space
    assert completion_ids(tok, prompt, tok.decode(drawn)) == drawn + [tok.eos_id]
    assert completion_ids(tok, prompt, tok.decode(drawn).lstrip()) == drawn + [tok.eos_id]
    chat = format_prompt("chat", "What is 2 + 3?", tokenizer=tok)
    assert chat.endswith("\n") and completion_ids(tok, chat, "5") == tok.encode("5", add_eos=True)


def test_chat_templates_render_with_transformers_environment(tmp_path):
    """Loop controls, strftime_now and tools=None, as transformers' apply_chat_template provides them
    (newer Qwen templates use {% break %}, Llama 3's puts today's date in its system line)."""
    import datetime

    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}"
                "|{{ strftime_now('%Y') }}|{{ tools is none }}|{{ {'b': 1, 'a': [2]} | tojson(sort_keys=True) }}")
    tok = load_hf_tokenizer(_hf_folder(tmp_path, template))
    text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])
    assert text == f'x|{datetime.date.today().year}|True|{{"a": [2], "b": 1}}'


def test_hf_tokenizer_without_template_or_pad(tmp_path):
    folder = _hf_folder(tmp_path, None)
    (folder / "special_tokens_map.json").unlink()
    tok = load_hf_tokenizer(folder / "tokenizer.json")
    assert tok.pad_id == tok.eos_id and tok.chat_template is None
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "Q"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_hf_tokenizer(tmp_path / "missing")
