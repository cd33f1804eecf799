"""Tiny tokenizers in the layouts Hugging Face checkpoints ship, trained on the spot (no download):
a GPT-2 or LLaMA-3 style byte-level BPE tokenizer.json, and a LLaMA-2 style SentencePiece model
(unk 0, bos 1, eos 2, no pad)."""

import json
import os

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
  r"\s+(?!\S)|\s+"
)


def byte_level_bpe(directory, texts, vocab_size=400, llama3=False, specials_last=False):
  """A GPT-2 (or LLaMA-3 style: regex split, BOS added by the post-processor) tokenizer.json with its
  tokenizer_config.json in `directory`; returns the `tokenizers.Tokenizer`. `specials_last` gives the
  special tokens the last ids (as GPT-2's <|endoftext|> = 50256) instead of the first."""
  specials = ["<|begin_of_text|>", "<|end_of_text|>"] if llama3 else ["<|endoftext|>"]
  tok = tokenizers.Tokenizer(models.BPE())
  if llama3:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  else:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[] if specials_last else specials,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer)
  if specials_last:
    tok.add_special_tokens(specials)
  if llama3:
    bos = tok.token_to_id(specials[0])
    tok.post_processor = processors.TemplateProcessing(
      single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)]
    )
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = (
    {"bos_token": specials[0], "eos_token": specials[1]}
    if llama3
    else {
      "bos_token": specials[0],
      "eos_token": {"__type": "AddedToken", "content": specials[0], "special": True},
      "unk_token": specials[0],
    }
  )
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  return tok


def llama2_sentencepiece(model_prefix, texts, vocab_size=300, **extra):
  """A SentencePiece BPE model with LLaMA-2's special ids (unk 0, bos 1, eos 2, no pad) at
  `model_prefix`.model (`extra`: more trainer options); returns that path."""
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_prefix=str(model_prefix),
    vocab_size=vocab_size,
    model_type="bpe",
    byte_fallback=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    minloglevel=2,
    num_threads=1,
    **extra,
  )
  return f"{model_prefix}.model"
