"""kaldrix tests."""
