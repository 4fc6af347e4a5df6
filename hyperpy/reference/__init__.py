"""Pure-Python reference implementations of hyperpy's Cython hot paths.

They compute the same results as the Cython code and exist for two reasons: tests compare the two,
and benchmarks report the Cython speed-up over them in the same run.  Never used by a normal VM.
"""
