"""`tunesmith export`: adapters merged into the base, a self-contained folder, checked before success.

The entry point is ``tunesmith.export.run.run(cfg) -> ExportReport`` (not re-exported here, so that the
name ``tunesmith.export.run`` stays the module).
"""
