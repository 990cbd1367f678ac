"""The data pipeline: raw files -> clean documents -> token shards on disk -> batches.

ingest (read text, JSON/JSONL, CSV) -> clean (HTML, whitespace) -> dedup (exact + MinHash) -> prepare (split,
tokenize, write shards with shards.py) -> loader (memory-mapped batches). datasets.py finds a prepared folder,
corpus.py is the embedded default text, task_data.py the prompt/completion files for fine-tuning.
"""
