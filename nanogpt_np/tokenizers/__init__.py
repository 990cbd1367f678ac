"""Tokenizers: byte-level BPE (GPT-2 compatible, bpe.py), characters (char.py), and load.py, which opens a
saved tokenizer file of either kind. bpe_cli.py trains and applies BPE from the command line."""
