"""Privacy audits: recompute every ε, check what crossed the wire, measure what an attacker learns (docs/audit.md)."""
