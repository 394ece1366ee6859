"""Runtimes: `cpu` (program order), `cuda` (streams, events, pinned memory, graphs), `sim` (checked, reordered)."""
