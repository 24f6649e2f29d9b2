"""Benchmarks of pet_hooks: ``python -m bench.run`` measures everything and writes BENCHMARKS.md."""
