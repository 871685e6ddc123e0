"""`scalecert bench`, its report, the pixel-masking baseline, the attack harness, pictures."""
