"""The pure compiled steps (OPD, SFT, RLVR) and what they share; streamed teachers and teachers
on their own devices."""
