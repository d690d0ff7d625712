"""Dataset condensation (DC, DSA, DM) and Batch Sampling; see utils.py for the names the paper's listings use."""
