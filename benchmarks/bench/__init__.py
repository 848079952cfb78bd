"""The pieces of ``benchmarks/accuracy.py``: geometry, pairs with a known answer, metrics,
the methods compared, running them, and the report."""
