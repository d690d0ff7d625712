"""Dataset condensation (DC, DSA, DM) and Batch Sampling; see utils.py for the seed's names."""
