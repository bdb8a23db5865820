"""Differential privacy: accounting math, the DP-SGD mechanism, and the on-device ledger."""
