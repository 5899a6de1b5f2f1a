"""fedsqueeze.wire package."""
