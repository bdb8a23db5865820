"""FedPGen command line: ``fedpgen simulate`` and friends."""
