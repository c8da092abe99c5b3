# The GPU recompile test must fail with inductor's strict mode (seqpack's option taken away).
import sys

sys.path.insert(0, "tests")
import seqpack.compile as compiling

compiling._options = lambda backend: {}
import test_gpu  # noqa: E402  (after the option is taken away)

try:
    test_gpu.test_no_recompile_when_the_packed_length_crosses_inductors_thresholds()
    print("STRICT MODE: no recompile seen (the test would not catch the regression)")
except AssertionError as e:
    print("STRICT MODE: recompiled, as expected without the option:", str(e)[:300])
