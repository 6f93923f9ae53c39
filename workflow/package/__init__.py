"""Encrypted, signed, attested model packages with keys held by a KMS or HSM (see archive.py for the format)."""
