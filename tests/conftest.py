"""Hermetic fixtures: tokenizers trained here, tiny random models, tiny JSONL files.

A few integration tests use the real bundled SmolLM2-135M-Instruct (session fixture, converted
once into the kdflow cache).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "wordnet_define"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KDFLOW_CACHE", str(ROOT / ".cache" / "kdflow"))
os.environ["WANDB_DISABLED"] = "true"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus(n: int = 600) -> list[str]:
    texts = []
    with open(DATA / "train.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            row = json.loads(line)
            texts += [row["prompt"], row["response"]]
    return texts


def untrained_tokenizer(kind: str, vocab_size: int, specials: list[str]):
    """(tokenizers.Tokenizer, its trainer) for a byte-level BPE, WordPiece or Unigram tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordpiece":
        tk = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tk.normalizer = normalizers.Lowercase()
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    elif kind == "unigram":
        tk = Tokenizer(models.Unigram())
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    else:
        raise ValueError(kind)
    return tk, trainer


def train_tokenizer(kind: str = "bpe", vocab_size: int = 400, chat: bool = True, pad_is_eos: bool = True):
    """A genuinely trained tokenizer (byte-level BPE, WordPiece or Unigram) wrapped for transformers."""
    from transformers import PreTrainedTokenizerFast

    tk, trainer = untrained_tokenizer(kind, vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<unk>"])
    tk.train_from_iterator(corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>",
        unk_token="<unk>",
        bos_token=None,
    )
    if chat:
        tok.chat_template = CHATML
    return tok


def tiny_llama(tok, layers: int = 2, hidden: int = 32, seed: int = 0, vocab_pad: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def bpe_tok():
    return train_tokenizer("bpe")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, bpe_tok):
    """Folders with a tiny teacher (4 layers) and student (2 layers) sharing one tokenizer."""
    base = tmp_path_factory.mktemp("models")
    teacher = tiny_llama(bpe_tok, layers=4, hidden=48, seed=1)
    student = tiny_llama(bpe_tok, layers=2, hidden=32, seed=2)
    out = {}
    for name, model in (("teacher", teacher), ("student", student)):
        d = base / name
        model.save_pretrained(d)
        bpe_tok.save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(scope="session")
def unigram_dir(tmp_path_factory):
    """A tiny client whose tokenizer (Unigram, SentencePiece-style) differs from the tiny_dirs BPE."""
    tok = train_tokenizer("unigram", vocab_size=500)
    d = tmp_path_factory.mktemp("unigram_client")
    tiny_llama(tok, layers=2, hidden=32, seed=21).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Small train/validation/test files cut from the bundled WordNet task."""
    base = tmp_path_factory.mktemp("data")
    out = {}
    for split, n in (("train", 64), ("validation", 8), ("test", 8)):
        rows = [json.loads(l) for l in (DATA / f"{split}.jsonl").read_text().splitlines()[:n]]
        out[split] = write_jsonl(base / f"{split}.jsonl", rows)
    return out


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct: (tokenizer, model), converted once into the cache."""
    from kdflow.config import ModelSpec
    from kdflow.models import freeze, load_model, load_tokenizer

    spec = ModelSpec(name="bundled:smollm2-135m-instruct")
    return load_tokenizer(spec), freeze(load_model(spec))
