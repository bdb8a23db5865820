"""FedPGen shared code: used by both the server and the devices."""
