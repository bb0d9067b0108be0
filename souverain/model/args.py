"""Architecture hyper-parameters: one frozen dataclass covers Mistral, Mixtral and Llama."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoeArgs:
    """Sparse mixture-of-experts feed-forward: each token goes to `num_experts_per_tok` of `num_experts`."""

    num_experts: int
    num_experts_per_tok: int


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. `kind` is "linear" or "llama3" (Llama 3.1's smooth band scaling)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors shipped with some checkpoints (GGUF `rope_freqs`), len head_dim // 2.
    rope_freq_factors: tuple[float, ...] | None = None
    max_seq_len: int = 4096
    # A token attends only to the last `sliding_window` positions (itself included).
    sliding_window: int | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    moe: MoeArgs | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.moe is not None and not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise ValueError(f"bad MoE top-k {self.moe.num_experts_per_tok} of {self.moe.num_experts}")

    @property
    def hd(self) -> int:
        """head_dim, never None after construction."""
        assert self.head_dim is not None
        return self.head_dim
