"""Fine-tuning: the loop (loop), its options and losses (config), devices and processes
(runtime), run files and resume (state), and what a run prints (progress)."""

__all__: list[str] = []
