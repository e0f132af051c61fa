"""vppo-rollout."""

__all__: list[str] = []
