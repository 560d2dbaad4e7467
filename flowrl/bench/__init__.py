"""Benchmarks: ``flowrl bench NAME``. Each compares its variants side by side in one run."""
