"""Data: registry, streaming readers, formats, chat templates, pure preprocessing.

Nothing in this package (except collate) imports torch or model code.
"""
