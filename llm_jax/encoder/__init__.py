"""BERT-style encoders on the decoder's blocks (model.causal=False): masked-LM pretraining, classification."""
