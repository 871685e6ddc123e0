"""numpy only: the method's math (window family, decision rule, SIN gate, numeric margin)."""
