"""Fine-tuning: the loop (loop), its options and losses (config), devices and processes
(runtime), and run files and resume (state)."""

__all__: list[str] = []
