"""Benchmarks behind `mesh-ray bench ...`: side-by-side measurements that return a dict and print a table."""
