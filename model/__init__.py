"""The next-word LSTM: its config, Keras definition, metrics and centralized baseline.

`model.config`, `model.weights` and `model.metrics` import only numpy (the device side may read
them); everything that needs TensorFlow lives in `model.keras_model` and `model.baseline`.
"""
