"""`cinemo-rt serve`: HTTP API, job store, batching worker, web page and Ray Serve deployment (see docs/serving.md)."""
