"""Benchmarks of cifar-cli against the W&B tutorial it grew from (`make bench`). Not part of the test suite."""
