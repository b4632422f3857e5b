"""What every transport shares: readiness and draining, API keys, the model lifecycle, shadows."""
