"""Peer servers the benchmark compares the JVP service against."""
