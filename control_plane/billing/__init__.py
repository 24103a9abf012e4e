"""Stripe top-ups (issue 13): Customers, PaymentIntents, the signed webhook and the one
idempotent function that turns a succeeded payment into a ledger credit."""
