"""Command-line tools, one module per subcommand (configure + run)."""
