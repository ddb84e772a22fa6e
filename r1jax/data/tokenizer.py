"""Tokenizers: one small protocol, a sentencepiece model trained offline, and HF tokenizer folders.

* `train_sentencepiece` trains the embedded demo's tokenizer on the task corpus: BPE, digits split
  one per token, the R1 tags (and the cold-start special token) as single user-defined pieces, byte
  fallback so any text round-trips, identity normalisation (no NFKC, no whitespace collapsing) so
  `decode(encode(text)) == text`, one thread so the model is byte-for-byte deterministic. The model
  is cached in a folder together with a fingerprint of (corpus, options): a second run with the
  same inputs loads it, a changed corpus retrains.
* `load_hf_tokenizer` reads an HF folder's `tokenizer.json` with the `tokenizers` library and the
  special tokens and chat template from `tokenizer_config.json`: no `transformers` at runtime.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from r1jax.data.templates import DEFAULT_SPECIAL_TOKEN, R1_TAGS

DEFAULT_USER_SYMBOLS = (*R1_TAGS, DEFAULT_SPECIAL_TOKEN)
SPM_MODEL_FILE = "spm.model"
SPM_FINGERPRINT_FILE = "spm.fingerprint.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, sampler and trainers need from a tokenizer.

    `bos_id` is None for models without a BOS token (e.g. Qwen2.5); `pad_id` always exists
    (falling back to EOS where the model defines no pad token).
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _with_specials(
    ids: list[int], bos: int | None, eos: int | None, add_bos: bool, add_eos: bool
) -> list[int]:
    if add_bos and bos is not None and ids[:1] != [bos]:  # a chat template may have rendered it already
        ids = [bos, *ids]
    if add_eos:
        if eos is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token")
        ids = [*ids, eos]
    return ids


# ---------------------------------------------------------------------------------------------
# sentencepiece


class SentencePieceTokenizer:
    """A sentencepiece model file behind the `Tokenizer` protocol."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = str(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        if self._sp.pad_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(
                f"{self.model_file}: the model defines no pad or eos piece; train with train_sentencepiece"
            )

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"

    def __getstate__(self):  # picklable for grain workers / process pools
        return {"model_file": self.model_file}

    def __setstate__(self, state):
        self.__init__(state["model_file"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return _with_specials(self._sp.encode(text), self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)


def _spm_options(vocab_size: int, user_symbols: Sequence[str], model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "pad_id": 0,
        "unk_id": 1,
        "bos_id": 2,
        "eos_id": 3,
        "user_defined_symbols": list(user_symbols),
        "split_digits": True,
        "byte_fallback": True,
        "character_coverage": 1.0,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": True,
        # A small corpus may not support vocab_size pieces: stop short instead of failing.
        "hard_vocab_limit": False,
        "max_sentence_length": 1 << 16,
        "shuffle_input_sentence": False,
        "input_sentence_size": 0,
        "num_threads": 1,
        "minloglevel": 2,
    }


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_dir: str | os.PathLike,
    *,
    user_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
    model_type: str = "bpe",
    options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> SentencePieceTokenizer:
    """Train (or load from `model_dir`, if trained there on the same inputs) a sentencepiece model.

    Args:
      texts: the corpus, one document per item (documents may contain newlines).
      vocab_size: target vocabulary size, including pad/unk/bos/eos, `user_symbols` and the 256
        byte-fallback pieces, so it must exceed 260 + len(user_symbols). A corpus too small for
        it gives a smaller vocabulary (see `Tokenizer.vocab_size`).
      model_dir: folder for `spm.model` and its fingerprint; created if needed.
      user_symbols: strings that always encode as one token.
      model_type: "bpe" or "unigram".
      options: further `SentencePieceTrainer` options, overriding the defaults (part of the cache
        fingerprint). E.g. `split_by_whitespace=False, split_by_unicode_script=False` lets pieces span
        words, so a fixed prompt template that fills the corpus becomes a handful of tokens.
      overwrite: replace a model that `model_dir` holds for other inputs. Off, that is an error: the
        models trained with it would read another tokenizer's ids.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs a non-empty corpus")
    minimum = 4 + len(user_symbols) + 256 + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} must be >= {minimum} (specials, user symbols, 256 bytes)")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r} must be 'bpe' or 'unigram'")
    options = {**_spm_options(vocab_size, user_symbols, model_type), **(options or {})}
    digest = hashlib.sha256()
    digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update(spm.__version__.encode())
    for t in texts:
        digest.update(hashlib.sha256(t.encode()).digest())
    fingerprint = {"sha256": digest.hexdigest(), "num_texts": len(texts), "options": options}

    model_dir = Path(model_dir)
    model_file, fp_file = model_dir / SPM_MODEL_FILE, model_dir / SPM_FINGERPRINT_FILE
    if model_file.exists() and fp_file.exists():
        try:
            cached = json.loads(fp_file.read_text())
        except json.JSONDecodeError:
            cached = {}
        if cached.get("sha256") == fingerprint["sha256"]:
            return SentencePieceTokenizer(model_file)
        if not overwrite:
            before = cached.get("options") or {}
            changed = sorted(k for k in {*before, *options} if before.get(k) != options.get(k))
            raise ValueError(f"{model_file} was trained on other inputs ({cached.get('num_texts')} texts, now "
                             f"{len(texts)}; options changed: {changed or 'none'}): models trained with it read its "
                             "ids. Use another folder, or overwrite=True to replace it")

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buffer, **options)
    model_dir.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a concurrent reader (another host or process) never sees half a file.
    for path, data in (
        (model_file, buffer.getvalue()),
        (fp_file, json.dumps(fingerprint, indent=1).encode()),
    ):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return SentencePieceTokenizer(model_file)


# ---------------------------------------------------------------------------------------------
# HF tokenizer folders


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """An HF tokenizer folder (tokenizer.json + tokenizer_config.json) behind the `Tokenizer` protocol.

    `encode` never applies the folder's post-processor (BOS is added only when asked, and not to a
    text that already begins with it), so that prompts rendered by a chat template, which contain
    their special tokens, are not given a second BOS. `decode` drops special tokens unless
    `skip_special_tokens=False`.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None,
        chat_template: str | None = None,
        skip_special_tokens: bool = True,
        path: str = "",
    ):
        self._tok = tokenizer
        self.path = path
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.skip_special_tokens = skip_special_tokens
        self._bos = self._id(bos_token, "bos_token")
        self._eos = self._id(eos_token, "eos_token")
        if self._eos is None:
            raise ValueError(f"{path}: no eos_token in tokenizer_config.json; pass eos_token= explicitly")
        pad = self._id(pad_token, "pad_token")
        self._pad = self._eos if pad is None else pad

    def _id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path}: {what}={token!r} is not in the vocabulary")
        return i

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return _with_specials(ids, self._bos, self._eos, add_bos, add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=self.skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        *,
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the folder's Jinja chat template, as `transformers` does."""
        if self.chat_template is None:
            raise ValueError(f"{self.path}: the tokenizer folder has no chat template")
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise ImportError("chat templates need jinja2: pip install jinja2") from e

        def raise_exception(message):
            raise TemplateError(message)

        # transformers' environment: {% break %} / {% continue %}, strftime_now (Llama 3's date line),
        # tojson with its options, and tools / documents defined (None) unless given
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        text = env.from_string(self.chat_template).render(
            **{"tools": None, "documents": None, **kwargs},
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        return self.encode(text) if tokenize else text


def load_hf_tokenizer(path: str | os.PathLike, *, skip_special_tokens: bool = True) -> HFTokenizer:
    """Load an HF tokenizer folder (as saved by `transformers` or downloaded from the Hub).

    Reads `tokenizer.json` (required), `tokenizer_config.json` (special tokens, chat template),
    `special_tokens_map.json` (fallback for special tokens) and `chat_template.jinja` /
    `chat_template.json` (newer `transformers` keep the template there).
    """
    from tokenizers import Tokenizer as _HFTok

    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
        raise FileNotFoundError(f"{tok_file} not found: load_hf_tokenizer needs a folder with tokenizer.json")

    def read_json(name: str) -> dict[str, Any]:
        f = folder / name
        if not f.exists():
            return {}
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: invalid JSON ({e})") from e

    config, special_map = read_json("tokenizer_config.json"), read_json("special_tokens_map.json")

    def special(name: str) -> str | None:
        return _token_content(config.get(name)) or _token_content(special_map.get(name))

    chat_template = config.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").exists():
        chat_template = read_json("chat_template.json").get("chat_template")
    if isinstance(chat_template, list):  # [{"name": "default", "template": …}, …]
        named = {t.get("name"): t.get("template") for t in chat_template}
        chat_template = named.get("default") or next(iter(named.values()), None)

    return HFTokenizer(
        _HFTok.from_file(str(tok_file)),
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
        pad_token=special("pad_token"),
        chat_template=chat_template,
        skip_special_tokens=skip_special_tokens,
        path=str(folder),
    )
