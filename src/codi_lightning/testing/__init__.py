"""Fixtures for tests and benchmarks (tiny teacher folders); product code does not
import this package."""
