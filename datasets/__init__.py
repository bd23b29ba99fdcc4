"""Federated text: corpora split by client, the SentencePiece tokenizer, and [B, T] windows.

Imports numpy and sentencepiece only, so the device side can use the tokenizer and windowing.
Nothing here reads or writes files at import time.
"""
