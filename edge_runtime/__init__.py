"""The edge runtime: everything that runs on a phone, and nothing that needs TensorFlow.

Modules, one concept each (pure policy apart from I/O):
    store          the typed text, kept on the device in SQLite with a retention policy
    device_state   idle / charging / unmetered / battery, from Linux or from a script
    eligibility    the pure "may this device train now?" policy (Gboard's conditions)
    scheduler      runs a training job step by step, checkpointing when a condition drops
    litert_model   the trainable TFLite model in LiteRT, its weights by manifest name
    trainer        one round's local training: windows, steps, Δ = local − global, clipping
    client         the HTTP client: enroll, check in, download, upload with retries
    model_store    downloaded model versions: verify, swap atomically, keep one for rollback
    suggester      top-3 next words, served while training and across model swaps
    device         the device loop that ties them together (`fedkb device`)

Imports are allowed from numpy, sentencepiece, requests, safetensors, ai-edge-litert and the
TF-free parts of `fedkb` and `datasets` only; a test walks this package to enforce it.
"""
