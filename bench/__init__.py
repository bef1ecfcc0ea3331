"""Benchmarks of the JVP service against its peers (`make bench`; see bench/README.md)."""
