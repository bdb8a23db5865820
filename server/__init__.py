"""FedPGen server side: the ServerApp, aggregation of shared deltas, checkpoints, results."""
