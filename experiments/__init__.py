"""Research scripts (recipe search, presence and cascade screens, the model card).

Run from the repository root as ``python -m experiments.<name>``.
"""
