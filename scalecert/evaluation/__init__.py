"""`scalecert bench`, its report, the pixel-masking and PatchCleanser baselines, pictures, dataset runs
(results files, Ray). The attack harness lives with the tests (tests/attack_harness.py)."""
