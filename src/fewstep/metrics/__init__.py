"""Sample-quality metrics: features first, then pure statistics on features."""
