"""Process groups and distributed setup for BlackMamba (TP / PP / EP / DP)."""
