"""Example domains used by the demo, the tests and the benchmark."""
