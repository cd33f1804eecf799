"""Data pipeline: raw text -> clean, deduplicated documents -> SentencePiece tokenizer -> token shards ->
deterministic, resumable Grain batches. See docs/data.md.

Modules: sources (corpus specs, stdlib corpus), cleaning (ftfy/NFC, whitespace, filters, PII), dedup
(exact + MinHash LSH), tokenizer (Tokenizer, train_tokenizer), shards (writer/reader), manifest
(manifest.json, verification, DATA_CARD.md), prepare (prepare(config) -> Prepared, CLI), loader
(TrainLoader, eval_batches), bench (benchmark command).
"""
