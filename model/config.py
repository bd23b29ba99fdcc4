"""The one typed configuration every part of the model reads its sizes from."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the next-word LSTM and of its static training batch.

    The defaults give about 1.15M parameters with an 8k vocabulary, the size class of the
    production keyboard models in Hard et al., 2018 (https://arxiv.org/abs/1811.03604).
    """

    vocab_size: int = 8000
    embed_dim: int = 96  # also the projection size: the output layer is tied to the embedding
    lstm_units: int = 256
    batch_size: int = 16  # B of the trainable TFLite model's static [B, T] signatures
    seq_len: int = 20  # T
    init_scale: float = 0.05  # uniform init range for embedding and kernels (Keras default-like)
    seed: int = 0

    def __post_init__(self):
        for field in ("vocab_size", "embed_dim", "lstm_units", "batch_size", "seq_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.vocab_size < 5:
            raise ValueError("vocab_size must cover the 4 reserved ids and at least one piece")

    @property
    def num_parameters(self) -> int:
        v, e, h = self.vocab_size, self.embed_dim, self.lstm_units
        return v * e + (e + h + 1) * 4 * h + h * e + e + v

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, body: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})
