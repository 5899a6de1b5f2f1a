"""fedsqueeze.transport package."""
