"""Code that runs on every training rank: loading, batching, the step, checkpoints, stopping, saving, tracking."""
