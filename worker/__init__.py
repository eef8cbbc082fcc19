"""GPU/CPU worker processes: drain Redis in microbatches, run the model, write results."""
