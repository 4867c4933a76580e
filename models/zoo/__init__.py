"""Small real models with seeded weights; each module exposes ``build() -> nn.Module``."""

__all__: list[str] = []
