"""fedkb: on-device federated next-word keyboard prediction.

This package holds the command line and the small pieces that both the server and the device
need. It must stay importable without TensorFlow or Flask: the device side imports it.
"""

__version__ = "0.1.0"
