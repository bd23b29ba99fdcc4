"""Keras → TFLite: a model that trains on the device, a fast inference model, and a manifest."""
