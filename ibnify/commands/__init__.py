"""The command layer between ``ibnify.cli`` and the library: one module per command that reads
files, each holding its options record (checked by ``check()`` before anything heavy) and its
``<verb>_files`` function, over the one input resolver in :mod:`.inputs`."""

__all__: list[str] = []
