"""The training loop, its losses and its optimiser set-up."""
