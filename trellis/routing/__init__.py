"""The router's domain: validation, replica choice, detokenization, the request flow."""
