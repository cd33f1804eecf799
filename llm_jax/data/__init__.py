"""Data pipeline: raw text -> clean, scrubbed, deduplicated documents -> SentencePiece tokenizer -> token
shards -> deterministic, resumable Grain batches. See docs/data.md.

Modules: sources (corpus specs, stdlib corpus), cleaning (ftfy/NFC, whitespace, quality filters), scrub
(personal data and secrets), dedup (exact + MinHash LSH), removals (removal requests, cached copies),
paragraphs (repeated paragraphs), tokenizer (Tokenizer, train_tokenizer), hf_tokenizer (Hugging Face
tokenizers), chat_template (an SFT turn as Jinja), shards (writer/reader), manifest
(manifest.json, verification, DATA_CARD.md), prepare (package: prepare(config) -> Prepared, its stages and
the command), loader (TrainLoader, eval_batches), bench (benchmark command).
"""
