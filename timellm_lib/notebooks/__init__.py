"""What exists for the notebooks and the CLI: explain checkpoints and resume, trace shapes,
plot, run studies and batch-run notebooks. Nothing under data/, models/, training/ or
evaluation/ imports from here."""
