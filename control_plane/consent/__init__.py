"""Consent (issue 15): the append-only consent records and what they add up to."""
