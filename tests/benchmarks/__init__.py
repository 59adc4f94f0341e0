"""Tests of the benchmark scripts that CI can run (dry runs at tiny sizes)."""
