"""vppo-recipes."""

__all__: list[str] = []
