"""FedPGen device side: the ClientApp and the on-device round logic."""
