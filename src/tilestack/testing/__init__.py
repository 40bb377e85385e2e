"""Tools for testing tilestack itself: the seeded fuzzer of the kernel library (``tilestack.testing.fuzz``)."""
