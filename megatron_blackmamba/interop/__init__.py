"""Interoperability with other BlackMamba checkpoint formats (Zyphra's released models)."""
