"""The TensorFlow-free, Flask-free core that the server and the device share.

Wire format, protocol messages, manifests, clipping, durable writes, the next-word beam search and
the flatbuffer weight rewrite that publishes new versions. Everything here imports only numpy,
safetensors and flatbuffers, so `edge_runtime` (the phone) and `aggregator` (the server) both may
import it; `tests/test_package_boundaries.py` enforces that. See docs/architecture.md.
"""
