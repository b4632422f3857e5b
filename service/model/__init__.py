"""The model as the gateway reads it: the repository's layout and each version's preprocessing contract."""
