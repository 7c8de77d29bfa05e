"""The pure compiled steps (OPD, SFT, RLVR) and what they share; streamed teachers."""
