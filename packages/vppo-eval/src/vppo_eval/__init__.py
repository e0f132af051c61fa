"""vppo-eval."""

__all__: list[str] = []
