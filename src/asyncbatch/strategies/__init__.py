"""Built-in strategies, one family per module. Each knows only its own interface and the core value types."""
