"""ModelArch: the architectural facts that tensor parallelism and the KV cache depend on."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ModelArch"]


@dataclass(frozen=True)
class ModelArch:
    """Hyper-parameters of a transformer (or ``None`` fields for non-transformers).

    Attributes:
        family: ``"llama"``, ``"gpt2"``, ``"gpt"`` (the hand-written one), ``"mlp"``, ``"cnn"``,
            or the transformers ``model_type``.
        hidden_size: width of the residual stream.
        num_layers: number of repeated blocks.
        num_heads: attention heads (query heads).
        num_kv_heads: key/value heads (``< num_heads`` under GQA).
        head_dim: per-head width.
        ffn_hidden_size: inner width of the MLP.
        vocab_size: vocabulary (embedding rows / head columns).
        tied_embeddings: the head reuses the embedding matrix.
        gated_mlp: the MLP has gate and up projections (SwiGLU) rather than one.
    """

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None
    tied_embeddings: bool = False
    gated_mlp: bool = False

    @property
    def is_transformer(self) -> bool:
        return self.num_heads is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_module(cls, model) -> ModelArch | None:
        """From ``model.config``: its ``to_arch()`` (``planner.models.GPTConfig``) or a
        transformers config; ``None`` when the model has neither."""
        config = getattr(model, "config", None)
        if hasattr(config, "to_arch"):
            return config.to_arch()
        if hasattr(config, "model_type"):
            return cls.from_hf_config(config)
        return None

    @classmethod
    def from_hf_config(cls, config) -> ModelArch:
        """Read a transformers ``PretrainedConfig`` (GPT-2 and Llama-style names)."""
        get = lambda *names, default=None: next(  # noqa: E731
            (getattr(config, n) for n in names if getattr(config, n, None) is not None), default
        )
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        kv = get("num_key_value_heads", default=heads)
        head_dim = get("head_dim", default=(hidden // heads) if hidden and heads else None)
        ffn = get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden if hidden else None)
        gated = getattr(config, "hidden_act", None) in ("silu", "swiglu") and hasattr(config, "intermediate_size")
        return cls(
            family=getattr(config, "model_type", "hf"),
            hidden_size=hidden,
            num_layers=get("num_hidden_layers", "n_layer", "num_layers"),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            ffn_hidden_size=ffn,
            vocab_size=get("vocab_size"),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            gated_mlp=gated,
        )
