"""Floor 2, metrics: the Prometheus metrics of every service, named as vLLM users chart them."""
