"""Built-in plugins: component registration, model presets, workloads, metrics and trace export."""
